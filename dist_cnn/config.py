"""One tree of dataclasses: defaults, config files (TOML, YAML or JSON), CLI flags, validation.

Precedence: dataclass defaults < config file (--config) < command-line flags.
Every field is a flag: `--<field-name>` with dashes, unless its metadata names another flag.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

from dist_cnn.data.shards.cache import parse_size
from dist_cnn.data.shards.order import parse_shuffle
from dist_cnn.data.shards.storage import storage_options
from dist_cnn.errors import UserError, one_line
from dist_cnn.models import registry as models
from dist_cnn.train.profiling import parse_range

DATASETS = ("cifar10", "cifar100", "fashion-mnist", "imagefolder", "shards", "synthetic")


def option(default, help: str, *, choices=None, flag: str | None = None, low=None, above=None, high=None, below=None):
    """A config field: its default, its --help text, its allowed values (choices, or a range:
    >= low, > above, <= high, < below) and (rarely) its flag name. Floats must also be finite."""
    meta = {"help": help, "choices": choices, "flag": flag, "low": low, "above": above, "high": high, "below": below}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    dataset: str = option("cifar10", "dataset to train on", choices=DATASETS)
    data_dir: str = option(
        "data",
        "where the dataset lives (or is downloaded to); shards: a folder, an http(s):// prefix or s3://bucket/prefix",
    )
    download: bool = option(True, "let torchvision download cifar10/cifar100 when missing")
    image_size: int = option(
        32,
        "imagefolder, shards: the square size images are prepared to (--eval-resize, --train-crop)",
        low=4,
        high=1024,
    )
    synthetic_train_size: int = option(10000, "synthetic: number of training images", low=1, high=200_000)
    synthetic_test_size: int = option(2000, "synthetic: number of test images", low=1, high=200_000)
    loader: str = option(
        "auto",
        "input pipeline: in-memory tensors on the device, a DataLoader over them, or "
        "stream (imagefolder: decode files per batch in workers, nothing cached); auto picks "
        "device, or stream for an image folder too large to decode into memory; the "
        "batches are the same whichever pipeline reads them",
        choices=("auto", "device", "dataloader", "stream"),
    )
    workers: int = option(
        -1,
        "DataLoader worker processes per rank (dataloader and stream pipelines); "
        "-1 = the CPUs available to each rank on the node",
        low=-1,
        high=256,
    )
    test_split: str = option("test", "imagefolder: the test split's folder beside train/ (ImageNet: val)")
    train_crop: str = option(
        "none",
        "training images: none = prepared as test images are (--eval-resize), then the batch "
        "augmentations; random-resized = RandomResizedCrop of the decoded file (--crop-scale; "
        "ImageNet recipes; image folders read by --loader stream or auto). The same for every loader",
        choices=("none", "random-resized"),
    )
    crop_scale: str = option(
        "0.08,1",
        "--train-crop random-resized: the crop's area range 'MIN,MAX' (one number s = 's,s')",
    )
    eval_resize: str = option(
        "stretch",
        "test images (and predict): stretch = resize to image_size x image_size (nothing to do when "
        "they are that size already); center-crop = resize the shorter side to floor(image_size / "
        "--eval-crop-ratio), then centre-crop. The same for every loader",
        choices=("stretch", "center-crop"),
    )
    eval_crop_ratio: float = option(
        0.875,
        "--eval-resize center-crop: the crop's share of the resized shorter side (1 = no margin)",
        above=0,
        high=1,
    )
    max_image_pixels: int = option(
        89_478_485,
        "image files: refuse one whose header declares more pixels than this, before decoding "
        "(PIL's limit; 0 = no limit)",
        low=0,
        high=2**40,
    )
    skip_bad_images: bool = option(
        False,
        "stream: replace unreadable training images by the next readable "
        "one and leave unreadable test images out, counted in the log and "
        "summary (default: stop with the file's name)",
    )
    decode: str = option(
        "cpu", "stream: decode JPEGs in the CPU workers, or in batches on the GPU (nvjpeg)", choices=("cpu", "gpu")
    )
    shuffle: str = option(
        "global",
        "shards: the epoch order: global (a permutation of all samples, random reads) or shards:K "
        "(shards in a random order, samples shuffled within windows of K shards: sequential-ish reads)",
    )
    storage_options: str = option(
        "", 'shards: fsspec options for http(s):// and s3:// as a JSON object, e.g. \'{"endpoint_url": "URL"}\''
    )
    shard_cache: str = option(
        "", "shards: a local folder caching whole shards (fetched once, then read by offset); '' = range reads"
    )
    shard_cache_size: str = option("20GB", "shards: --shard-cache's size limit (least recently used shards go first)")
    normalize: str = option(
        "dataset",
        "per-channel normalization: the training set's mean/std, or 0.5/0.5 as in the tutorial",
        choices=("dataset", "half"),
    )
    crop_padding: int = option(
        0, "random-crop augmentation: pad by this many pixels (reflect), 0 = off", low=0, high=16
    )
    flip: bool = option(False, "random horizontal flip augmentation")
    alternate_flip: bool = option(
        False, "with --flip: each image is flipped in alternate epochs (airbench) instead of independently at random"
    )
    auto_augment: str = option(
        "none",
        "per-image auto-augment policy (torchvision v2): RandAugment, TrivialAugmentWide or AugMix",
        choices=("none", "ra", "ta_wide", "augmix"),
    )
    random_erase: float = option(0.0, "probability of random erasing per image (v2.RandomErasing)", low=0, high=1)
    mixup_alpha: float = option(
        0.0, "MixUp on each batch with this Beta alpha, soft-target loss (0 = off)", low=0, high=100
    )
    cutmix_alpha: float = option(
        0.0,
        "CutMix on each batch with this Beta alpha (0 = off; with MixUp: one of the two per batch)",
        low=0,
        high=100,
    )


@dataclass
class ModelConfig:
    name: str = option("seed", models.model_help(), flag="--model")  # checked by models.check_spec
    pretrained: bool = option(
        False,
        "torchvision:/timm: models: start from the library's pretrained weights "
        "(read from the local torch hub / Hugging Face cache)",
    )
    init_from: str = option(
        "",
        "start from the weights of a dist_cnn model.pt or checkpoint (fine-tuning); a "
        "classifier head for another class count is re-initialized",
    )
    output_key: str = option(
        "", "which element of a model's tuple or dict output holds the logits: an index or a key (default: the output)"
    )
    channels_last: bool = option(True, "channels_last memory format (faster convolutions)")
    compile: bool = option(False, "torch.compile the model")
    sync_bn: bool = option(False, "convert BatchNorm to SyncBatchNorm under DDP")
    freeze_whiten_bias_after: int = option(
        3, "airbench: stop training the whitening bias after N epochs", low=0, high=1_000_000
    )
    ddp_comm_hook: str = option(
        "none",
        "DDP gradient communication: as is, compressed to bf16 or fp16 on the "
        "wire, or PowerSGD low-rank compression (torch's ddp_comm_hooks)",
        choices=("none", "bf16", "fp16", "powersgd"),
    )
    powersgd_rank: int = option(1, "--ddp-comm-hook powersgd: rank of the gradient approximation", low=1, high=1024)
    powersgd_warmup_steps: int = option(
        100, "--ddp-comm-hook powersgd: plain all_reduce for the first N steps", low=2, high=10**9
    )


@dataclass
class OptimConfig:
    lr: float = option(0.08, "peak learning rate for the global batch", above=0, high=1e9)
    momentum: float = option(0.9, "SGD momentum", low=0, below=1)
    nesterov: bool = option(True, "Nesterov momentum")
    weight_decay: float = option(
        5e-4,
        "weight decay, SGD's coupled form; a group whose LR is k x --lr gets it / k, "
        "so the decay per step is the same everywhere (biases and norm parameters: "
        "only with --bias-decay)",
        low=0,
        high=1,
    )
    bias_decay: bool = option(False, "weight decay on biases and norm parameters too (airbench)")
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy loss", low=0, below=1)
    bias_lr_scale: float = option(
        1.0, "LR multiplier for BatchNorm parameters (airbench: 64 for its BN biases)", above=0, high=1000
    )
    schedule: str = option(
        "onecycle",
        "LR schedule: linear warmup then linear decay to 0 (onecycle), "
        "warmup then cosine, constant, or triangle (airbench: --lr-start x LR at step 0, "
        "peak after --warmup of the steps, --lr-end x LR at the end)",
        choices=("onecycle", "cosine", "constant", "triangle"),
    )
    warmup: float = option(0.2, "warmup length (steps to the peak LR) as a fraction of all steps", low=0, high=1)
    lr_start: float = option(0.2, "triangle schedule: LR multiplier at the first step", low=0, high=1)
    lr_end: float = option(0.07, "triangle schedule: LR multiplier at the last step", low=0, high=1)
    clip_grad_norm: float = option(0.0, "clip the gradients' global norm to this value (0 = off)", low=0, high=1e9)


@dataclass
class TrainConfig:
    epochs: float = option(
        2.0,
        "training epochs; a fraction trains ceil(epochs x steps per epoch) steps (airbench: 9.9)",
        above=0,
        high=100_000,
    )
    batch_size: int = option(128, "global batch size, across all ranks", low=1, high=1 << 24)
    seed: int = option(0, "random seed (weights, data order, augmentation)", low=0, high=2**32 - 1)
    precision: str = option("auto", "autocast precision", choices=("auto", "fp32", "bf16", "fp16"))
    grad_accum: int = option(1, "micro-batches per optimizer step", low=1, high=4096)
    max_steps: int = option(0, "stop after this many optimizer steps (0 = no limit)", low=0, high=10**9)
    eval_every: int = option(1, "evaluate every N epochs (0 = only at the end)", low=0, high=100_000)
    log_every: int = option(50, "log train loss every N optimizer steps", low=1, high=1_000_000)
    nonfinite_patience: int = option(3, "stop after this many consecutive non-finite steps", low=1, high=1_000_000)
    lookahead_every: int = option(
        0, "lookahead/EMA of weights every N steps, weights reset to the EMA (0 = off)", low=0, high=1_000_000
    )
    lookahead_decay: float = option(
        0.95, "per-step EMA decay of the lookahead, ramped up cubically over training", above=0, below=1
    )
    tta: int = option(0, "test-time augmentation: 0 none, 1 mirror, 2 mirror + 1-pixel translations", low=0, high=2)
    model_ema: bool = option(False, "keep an EMA of the weights, evaluated and checkpointed beside the model")
    model_ema_decay: float = option(
        0.99998, "EMA decay, adjusted by global batch x steps / epochs as torchvision's reference", above=0, below=1
    )
    model_ema_steps: int = option(32, "update the EMA every N optimizer steps", low=1, high=1_000_000)
    malloc_tune: bool = option(
        True,
        "CPU: glibc malloc keeps freed activation buffers (mallopt) instead of "
        "returning them to the OS every step, which page-faults them back in",
    )


@dataclass
class DistConfig:
    backend: str = option("auto", "process group backend", choices=("auto", "nccl", "gloo"))
    timeout: float = option(
        300.0,
        "seconds a collective, or a request to a shards server (http/s3), may wait before the job fails",
        low=1,
        high=7 * 86400,
    )
    setup_timeout: float = option(
        3600.0,
        "seconds the other ranks wait for rank 0's one-time setup (preparing the run directory, listing or "
        "decoding the dataset) before the job fails; --timeout bounds the collectives of training",
        low=1,
        high=7 * 86400,
    )


@dataclass
class CheckpointConfig:
    resume: str = option("none", "resume from: auto (newest valid checkpoint in --out), none, or a path")
    keep: int = option(
        3, "keep the newest K checkpoints (plus the best)", flag="--keep-checkpoints", low=1, high=1_000_000
    )
    every_steps: int = option(
        0, "checkpoint every N optimizer steps (0 = off)", flag="--checkpoint-every-steps", low=0, high=10**9
    )
    every_minutes: float = option(
        10.0, "checkpoint every N minutes (0 = off)", flag="--checkpoint-every-minutes", low=0, high=1_000_000
    )
    on_write_error: str = option(
        "continue", "when a checkpoint write fails: warn and continue, or stop", choices=("continue", "stop")
    )


@dataclass
class LogConfig:
    out: str = option("", "run directory (default runs/<timestamp>-<model>-<dataset>)")
    progress: bool = option(True, "tqdm progress bar on a terminal (plain lines otherwise)")
    plots: bool = option(
        True, "draw the run's PNG plots into --out when training ends (`dist-cnn report RUN_DIR` draws them any time)"
    )
    wandb: str = option("auto", "Weights & Biases mode", choices=("auto", "online", "offline", "disabled"))
    wandb_project: str = option("dist_cnn", "W&B project")
    wandb_entity: str = option("", "W&B entity (team or user)")
    wandb_tags: list = option([], "W&B tags")
    wandb_group: str = option("", "W&B group")
    run_name: str = option("", "run name (W&B and reports)")
    tensorboard: bool = option(
        False, "rank 0 writes TensorBoard event files into <run dir>/tensorboard/ (needs the tensorboard package)"
    )
    profile: str = option(
        "",
        "START:END: record torch.profiler for optimizer steps START..END-1 (0-based); a "
        "Chrome trace per rank in <run dir>/profile/, rank 0 prints the split of step time",
    )
    profile_stack: bool = option(False, "--profile: record Python stacks too (larger traces, more overhead)")
    log_level: str = option(
        "INFO",
        "console messages shown: rank 0 at this level, the other ranks at WARNING (or this level when stricter)",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
    )


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


def sections():
    hints = typing.get_type_hints(Config)
    return [(f.name, hints[f.name]) for f in fields(Config)]


def flag_name(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (a UserError), not the whole usage text."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def _range_text(f) -> str:
    """'; 1 to 1000' etc. for --help, from the field's range."""
    m = f.metadata
    lo = f">= {m['low']}" if m.get("low") is not None else f"> {m['above']}" if m.get("above") is not None else ""
    hi = f"<= {m['high']}" if m.get("high") is not None else f"< {m['below']}" if m.get("below") is not None else ""
    return f"; {lo}, {hi}" if lo and hi else f"; {lo or hi}" if lo or hi else ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field; defaults are shown but not set, so only given flags override."""
    parser.add_argument("--config", help="config file (.toml, .yaml or .json); flags override it")
    for section, cls in sections():
        group = parser.add_argument_group(section)
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            default = f.default if f.default is not MISSING else f.default_factory()
            kw = dict(
                dest=f"{section}.{f.name}",
                default=argparse.SUPPRESS,
                help=f"{f.metadata['help']} (default: {default!r}{_range_text(f)})",
            )
            typ = hints[f.name]
            if typ is bool:
                kw["action"] = argparse.BooleanOptionalAction
            elif typ is list:
                kw.update(nargs="*", metavar="ITEM")
            else:
                kw.update(type=typ, choices=f.metadata.get("choices"))
                if not kw["choices"]:
                    kw["metavar"] = {int: "N", float: "X", str: "STR"}[typ]
            group.add_argument(flag_name(f), **kw)


def train_parser(prog: str = "train.py") -> ArgumentParser:
    """The training command line: every config field, --config, and --dry-run."""
    parser = ArgumentParser(
        prog=prog, description="Train a CNN with dist_cnn (one process, torchrun, srun or accelerate launch)."
    )
    add_arguments(parser)
    parser.add_argument(
        "--trust-model-code",
        action="store_true",
        help="on resume, build the package.module:factory model the checkpoint names without naming it "
        "with --model (imports and calls that module: only for checkpoints you trust) (default: False)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print what was detected (launcher, rank, world size, device, backend, head "
        "address, SLURM job, CUDA, threads), check the launch against the allocation "
        "and exit without training; the same as `dist-cnn doctor` (default: False)",
    )
    return parser


def _check_type(where: str, value, typ):
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is list and isinstance(value, list):
        if all(isinstance(v, str) for v in value):
            return value
        raise UserError(
            f"{'' if where.startswith('--') else 'config: '}{where} must be a list of strings, got {str(value)[:80]!r}"
        )
    if type(value) is not typ:
        prefix = "" if where.startswith("--") else "config: "
        raise UserError(f"{prefix}{where} must be {typ.__name__}, got {type(value).__name__} {str(value)[:80]!r}")
    return value


class _UniqueKeyLoader:
    """A yaml SafeLoader whose mappings refuse a key given twice (YAML's own rule; PyYAML keeps the last)."""

    @staticmethod
    def make():
        import yaml

        class Loader(yaml.SafeLoader):
            def construct_mapping(self, node, deep=False):
                seen = set()
                for key_node, _ in node.value:
                    key = self.construct_object(key_node, deep=True)
                    if key in seen:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"duplicate key {key!r} (line {key_node.start_mark.line + 1})"
                        )
                    seen.add(key)
                return super().construct_mapping(node, deep)

        return Loader


def _json_no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def load_file(path: str) -> dict:
    """A config file as a nested dict: TOML, YAML (duplicate keys refused) or JSON (parsed as JSON,
    so the run's own config.json can be fed back)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file not found: {path}")
    if p.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise UserError(f"config file {path}: use .toml, .yaml or .json")
    try:
        text = p.read_text()
        if p.suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        elif p.suffix == ".json":
            data = json.loads(text, object_pairs_hook=_json_no_duplicates)
        else:
            import yaml

            data = yaml.load(text, Loader=_UniqueKeyLoader.make())
            data = {} if data is None else data
    except Exception as e:  # parser errors: one line naming the file
        raise UserError(f"config file {path}: {one_line(e)}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path}: top level must be a mapping of sections")
    return data


def apply_dict(cfg: Config, data: dict, where: str = "config") -> None:
    """Set fields from a nested {section: {key: value}} mapping; unknown keys and wrong types are errors."""
    known = dict(sections())
    for section, values in data.items():
        if section not in known:
            raise UserError(f"{where}: unknown section {section!r} (known: {', '.join(known)})")
        if not isinstance(values, dict):
            raise UserError(f"{where}: [{section}] must be a table of settings")
        obj = getattr(cfg, section)
        hints = typing.get_type_hints(known[section])
        for key, value in values.items():
            if key not in hints:
                raise UserError(f"{where}: unknown key {section}.{key} (known: {', '.join(hints)})")
            setattr(obj, key, _check_type(f"{section}.{key}", value, hints[key]))


def _check_field(f, value) -> None:
    m, flag = f.metadata, flag_name(f)
    if m.get("choices") and value not in m["choices"]:
        raise UserError(f"{flag}: {value!r} is not one of {', '.join(map(str, m['choices']))}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{flag} must be a finite number, got {value}")
    bounds = (
        (
            ("low", ">=", value.__lt__),
            ("above", ">", value.__le__),
            ("high", "<=", value.__gt__),
            ("below", "<", value.__ge__),
        )
        if isinstance(value, (int, float)) and not isinstance(value, bool)
        else ()
    )
    for key, word, breaks in bounds:
        if m.get(key) is not None and breaks(m[key]):
            positive = (
                (key, m[key]) in (("above", 0), ("low", 1))
                and not isinstance(value, float)
                or (key, m[key]) == ("above", 0)
            )
            raise UserError(f"{flag} must be {'positive' if positive else f'{word} {m[key]}'}, got {value}")


# Free-text options that must not be empty; characters W&B refuses in project names.
NONEMPTY = {"data.data_dir", "ckpt.resume", "log.wandb_project"}
WANDB_NAME_FORBIDDEN = set("/\\#?%:")


def _check_text(flag: str, value: str, key: str) -> None:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise UserError(f"{flag}: control characters are not allowed, got {value[:80]!r}")
    if key in NONEMPTY and not value.strip():
        raise UserError(f"{flag} must not be empty")
    if key == "log.wandb_project" and WANDB_NAME_FORBIDDEN & set(value):
        raise UserError(f"{flag}: W&B project names cannot contain any of {' '.join(sorted(WANDB_NAME_FORBIDDEN))}")
    if key == "log.wandb_tags" and len(value) > 64:
        raise UserError(f"{flag}: W&B tags are at most 64 characters, got {len(value)}")


def validate(cfg: Config) -> None:
    """Every field against its type and its own metadata (choices, range, finiteness; text without
    control characters), before any work starts; cross-field rules last."""
    for section, cls in sections():
        obj, hints = getattr(cfg, section), typing.get_type_hints(cls)
        for f in fields(cls):
            value, typ = getattr(obj, f.name), hints[f.name]
            _check_type(flag_name(f), value, typ)
            _check_field(f, value)
            for text in value if typ is list else [value] if typ is str else []:
                _check_text(flag_name(f), text, f"{section}.{f.name}")
    if cfg.data.dataset in ("imagefolder", "shards") and cfg.data.crop_padding >= cfg.data.image_size:
        raise UserError(
            f"--crop-padding {cfg.data.crop_padding} must be smaller than --image-size {cfg.data.image_size}"
        )
    if cfg.log.tensorboard and importlib.util.find_spec("tensorboard") is None:  # an optional extra
        raise UserError("--tensorboard needs the tensorboard package: pip install 'dist_cnn[tensorboard]'")
    models.check_spec(cfg.model.name)
    parse_range(cfg.log.profile)
    _check_data(cfg.data)


def _check_data(d) -> None:
    """What one field's metadata cannot say."""
    if not d.test_split or d.test_split in (".", "..", "train") or "/" in d.test_split:
        raise UserError(f"--test-split must name a folder beside train/ (e.g. test or val), got {d.test_split!r}")
    parse_crop_scale(d.crop_scale)
    if d.loader == "stream" and d.dataset not in ("imagefolder", "shards"):
        raise UserError(f"--loader stream reads image folders: use --dataset imagefolder (got {d.dataset})")
    if d.dataset == "shards" and d.loader not in ("stream", "auto"):
        raise UserError(f"--dataset shards is streamed: use --loader stream or auto (got --loader {d.loader})")
    if d.train_crop == "random-resized" and (
        d.dataset not in ("imagefolder", "shards") or d.loader in ("device", "dataloader")
    ):
        raise UserError(
            "--train-crop random-resized crops the decoded image files: use --dataset imagefolder or shards with "
            f"--loader stream or auto (got --dataset {d.dataset} --loader {d.loader})"
        )
    _check_shards(d)
    if d.dataset not in ("imagefolder", "shards") and d.image_size != DataConfig.image_size:
        raise UserError(
            f"--image-size is for --dataset imagefolder or shards; {d.dataset} images keep their own size "
            f"(got --image-size {d.image_size})"
        )
    if d.decode == "gpu" and d.loader not in ("stream", "auto"):
        raise UserError(f"--decode gpu is for --loader stream (got --loader {d.loader})")


def _check_shards(d) -> None:
    if parse_shuffle(d.shuffle) is not None and d.dataset != "shards":
        raise UserError(f"--shuffle {d.shuffle} orders shards: use it with --dataset shards")
    storage_options(d.storage_options)
    parse_size(d.shard_cache_size, "--shard-cache-size")


def parse_crop_scale(text: str) -> tuple[float, float]:
    """'0.08,1' -> (0.08, 1.0); one number s means (s, s)."""
    try:
        parts = [float(p) for p in str(text).replace(" ", "").split(",")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or not 0 < parts[0] <= parts[1] <= 1:
        raise UserError(f"--crop-scale: expected 'MIN,MAX' with 0 < MIN <= MAX <= 1 (or one number), got {text!r}")
    return parts[0], parts[1]


def from_args(ns: argparse.Namespace) -> Config:
    """Defaults, then the --config file, then the flags that were given; validated."""
    cfg = Config()
    given: set[str] = set()
    if getattr(ns, "config", None):
        data = load_file(ns.config)
        apply_dict(cfg, data, where=f"config file {ns.config}")
        given |= keys_of(data)
    nested: dict = {}
    for key, value in vars(ns).items():
        if "." in key:
            section, name = key.split(".", 1)
            nested.setdefault(section, {})[name] = value
    apply_dict(cfg, nested, where="flags")
    mark_given(cfg, given | keys_of(nested), trust_model_code=getattr(ns, "trust_model_code", False))
    validate(cfg)
    return cfg


def option_field(key: str):
    """(section, dataclass field, type) of an option named 'section.field' (e.g. optim.lr); None if unknown."""
    section, _, name = key.partition(".")
    cls = dict(sections()).get(section)
    found = [f for f in fields(cls) if f.name == name] if cls else []
    return (section, found[0], typing.get_type_hints(cls)[name]) if found else None


def flag_of(f) -> str:
    """The command-line flag of a config field (--lr for optim.lr)."""
    return flag_name(f)


def with_option(cfg: Config, key: str, value) -> Config:
    """A copy of `cfg` with one option set, checked as a flag would be (type, range, cross-field rules)."""
    found = option_field(key)
    if found is None:
        raise UserError(f"unknown option {key!r}")
    section, f, typ = found
    out = copy.deepcopy(cfg)
    setattr(getattr(out, section), f.name, _check_type(flag_name(f), value, typ))
    validate(out)
    return out


def keys_of(nested: dict) -> set[str]:
    """{section: {name: value}} -> {"section.name"}."""
    return {f"{section}.{name}" for section, values in nested.items() for name in values}


def mark_given(cfg: Config, keys: set[str], *, trust_model_code: bool = False) -> None:
    """Remember which options the user set (flags, --config, API options) and whether they passed
    --trust-model-code: a resumed run takes the others from its checkpoint (train/resume_rules.py).
    Kept beside the fields, never saved: a file cannot grant itself trust."""
    cfg.__dict__["given"] = frozenset(keys)
    cfg.__dict__["trust_model_code"] = bool(trust_model_code)


def given_keys(cfg: Config) -> frozenset:
    return cfg.__dict__.get("given", frozenset())


def trusts_model_code(cfg: Config) -> bool:
    return cfg.__dict__.get("trust_model_code", False)


def to_dict(cfg: Config) -> dict:
    return asdict(cfg)


def from_dict(data: dict) -> Config:
    cfg = Config()
    apply_dict(cfg, data)
    return cfg


def save(cfg: Config, path: Path) -> None:
    path.write_text(json.dumps(to_dict(cfg), indent=2) + "\n")


assert all(is_dataclass(t) for _, t in sections())
assert all(
    any(f.metadata.get(k) is not None for k in ("low", "above"))
    and any(f.metadata.get(k) is not None for k in ("high", "below"))
    for _, t in sections()
    for f in fields(t)
    if typing.get_type_hints(t)[f.name] in (int, float)
), "every number needs both ends of its range"
