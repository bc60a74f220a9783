"""`dist-cnn eval --checkpoint PATH`: the test metrics of a saved model, at any world size."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path

import torch

from dist_cnn import config as config_mod
from dist_cnn.data.open import open_source
from dist_cnn.data.source import upgrade_stored_config
from dist_cnn.distributed import process_group
from dist_cnn.errors import UserError
from dist_cnn.fileio import STDOUT, check_output, write_output
from dist_cnn.models.prepare import prepare_model
from dist_cnn.models.trust import add_trust_arguments, check_file_spec
from dist_cnn.observability.format import display_names, percent
from dist_cnn.train import checkpoint, precision
from dist_cnn.train.ema import plain_weights
from dist_cnn.train.evaluate import evaluate_source


def _batch_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not 1 <= value <= 1 << 24:
        raise argparse.ArgumentTypeError(f"must be in [1, {1 << 24}], got {value}")
    return value


def eval_parser():
    p = config_mod.ArgumentParser(
        prog="dist-cnn eval",
        description="Evaluate a checkpoint on a test set "
        "(training's exact, distributed evaluation; torchrun works too).",
    )
    p.add_argument("--checkpoint", required=True, help="a step-N.pt/best.pt checkpoint or a model.pt export")
    add_trust_arguments(p)
    p.add_argument("--dataset", choices=config_mod.DATASETS, help="default: the checkpoint's dataset")
    p.add_argument("--data-dir", help="default: the checkpoint's data dir")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="autocast precision (default: fp32)",
    )
    p.add_argument("--batch-size", type=_batch_size, default=1000, help="evaluation batch per rank (default: 1000)")
    p.add_argument(
        "--weights",
        default="model",
        choices=("model", "ema"),
        help="the trained weights, or their EMA (runs with --model-ema) (default: model)",
    )
    p.add_argument(
        "--output",
        help="write the metrics here as JSON (a FIFO or device is written into, - is stdout) "
        "(default: eval-<checkpoint>.json beside it)",
    )
    p.add_argument(
        "--predictions",
        metavar="FILE",
        help="also write each test sample's prediction as CSV: sample,label,prediction (class names, in "
        "the test set's order; prediction empty for a sample left out)",
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        metavar="N",
        help="image files: refuse one whose header declares more pixels than this, before decoding; "
        "0 = no limit (default: the run's)",
    )
    return p


def main_eval(argv) -> int:
    args = eval_parser().parse_args(argv)
    for flag in ("--output", "--predictions"):
        if getattr(args, flag[2:]):
            check_output(getattr(args, flag[2:]), [args.checkpoint], flag)
    state = checkpoint.load(Path(args.checkpoint))
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("config"), dict)
        or not isinstance(state.get("model"), dict)
    ):
        what = checkpoint.describe(state) if not isinstance(state, dict) else "no config/model in it"
        raise UserError(f"{args.checkpoint} is not a dist_cnn checkpoint or model.pt ({what})")
    if args.weights == "ema":
        if not state.get("ema"):
            raise UserError(f"{args.checkpoint} has no EMA weights (the run had no --model-ema)")
        state = dict(state, model=plain_weights(state["ema"]))
    stored = dict(state["config"])
    if isinstance(stored.get("data"), dict):  # runs from before the recipe options: their loader's recipe
        stored["data"] = upgrade_stored_config(stored["data"], state.get("loader"))
    try:
        cfg = config_mod.from_dict(stored)
    except UserError as e:
        raise UserError(f"{args.checkpoint}: its config does not fit this version ({e})") from None
    check_file_spec(cfg.model.name, args.checkpoint, named=args.model, trust=args.trust_model_code)
    if args.dataset:
        cfg.data.dataset = args.dataset
    if args.data_dir:
        cfg.data.data_dir = args.data_dir
    if args.max_image_pixels is not None:
        if args.max_image_pixels < 0:
            raise UserError(f"--max-image-pixels must be >= 0, got {args.max_image_pixels}")
        cfg.data.max_image_pixels = args.max_image_pixels
    if state.get("loader") == "stream":  # read as it was trained (the batches are the same either way)
        cfg.data.loader = "stream"
    cfg.data.train_crop = "none"  # nothing is trained here: the test split's transform alone matters
    if cfg.data.loader != "stream":  # runs from before it was refused in memory recorded it, unused
        cfg.data.skip_bad_images = False
    with process_group.process_group(cfg.dist.backend, cfg.dist.timeout, cfg.dist.setup_timeout) as env:
        data, _ = open_source(cfg.data, env, measure="mean" not in state, timeout=cfg.dist.timeout)
        _check_classes(state, data, cfg)
        prepared = prepare_model(cfg, data, env.device, state)  # training's memory format: its arithmetic
        mine = [] if args.predictions else None
        res = evaluate_source(
            prepared.model,
            data,
            normalize=prepared.normalize,
            env=env,
            precision=precision.resolve(args.precision, env.device),
            batch_size=args.batch_size,
            workers=cfg.data.workers,
            tta=cfg.train.tta,
            predictions=mine,
        )
        preds = _gather(mine, env) if args.predictions else None
        if env.is_rank0:
            _report(args, cfg, data, env, res)
            if preds is not None:
                _write_predictions(Path(args.predictions), data, preds)
    return 0


def _gather(mine: list, env) -> list[int]:
    """Every rank's predictions, in rank order: the test set's order (contiguous shards)."""
    if not env.initialized:
        return mine
    parts = [None] * env.world_size
    torch.distributed.all_gather_object(parts, mine)
    return [p for part in parts for p in part]


def _write_predictions(path: Path, data, preds: list[int]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["sample", "label", "prediction"])
    for i, p in enumerate(preds):
        label = data.test_label(i)
        w.writerow([data.test_name(i), data.classes[label], data.classes[p] if p >= 0 else ""])
    try:
        write_output(str(path), buf.getvalue().encode())
    except OSError as e:
        raise UserError(f"--predictions {path}: cannot write it ({e.strerror or e})") from None


def _check_classes(state: dict, data, cfg) -> None:
    """The model's classes are the dataset's, by name and order: otherwise every number is wrong."""
    trained = state.get("classes")
    if trained is not None and list(trained) != list(data.classes):

        def show(names):
            return ", ".join(map(str, names[:6])) + (f", ... ({len(names)} classes)" if len(names) > 6 else "")

        raise UserError(
            f"the model was trained on classes [{show(list(trained))}] but {cfg.data.dataset} in "
            f"{cfg.data.data_dir} has [{show(list(data.classes))}]: evaluate it on its own dataset"
        )


def _report(args, cfg, data, env, res: dict) -> None:
    res = {
        "checkpoint": str(args.checkpoint),
        "weights": args.weights,
        "dataset": cfg.data.dataset,
        "model": cfg.model.name,
        "classes": data.classes,
        "world_size": env.world_size,
        **res,
    }
    console = sys.stderr if args.output == STDOUT else sys.stdout  # stdout carries the JSON then
    print(f"test accuracy {res['test_accuracy']:.4f} ({res['test_correct']}/{res['test_total']})", file=console)
    per_class = res["per_class_accuracy"]
    for name, acc in zip(display_names(data.classes, len(per_class)), per_class):
        print(f"  {name:<12} {percent(acc)}", file=console)
    ckpt = Path(args.checkpoint)
    out = args.output or str(ckpt.with_name(f"eval-{ckpt.stem}.json"))
    try:
        write_output(out, (json.dumps(res, indent=2) + "\n").encode())
    except OSError as e:
        print(f"warning: could not write {out}: {e.strerror or e}", file=sys.stderr)
