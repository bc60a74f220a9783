"""Streaming image folders: each rank decodes only its own files, per sample, in DataLoader workers.

For folders too large to decode into memory (ImageNet: 1.28 M JPEGs). Nothing is cached: a process
holds the file list (one numpy bytes array, not a Python object per image) and the batches in flight,
so its memory does not grow with the number of images.

The guarantees of the in-memory pipelines carry over:
- an epoch's order is loader.epoch_plan(seed, epoch); global batch i is plan positions [i*B, (i+1)*B)
  and rank r takes the r-th slice of it (loader.rank_slice), so resuming at step k replays exactly;
- an image's random crop is a pure function of (seed, epoch, image index): torchvision's
  RandomResizedCrop draws its parameters from a generator seeded with a hash of the three, in the
  worker; flips (--flip, --alternate-flip) are the epoch plan's draws, as elsewhere, applied in the
  worker after the crop; padded crops (--crop-padding) are the plan's draws too, on the whole batch;
- evaluation reads this rank's contiguous shard (loader.eval_shard) and scores each test image once.

Unreadable files (zero bytes, truncated, not an image) are found when a worker decodes them: the run
stops with one line naming the file. With skip_bad_images a training sample is replaced by the next
readable image in file order (a pure function of the index, so every world size and every resume
sees the same replacement) and a test image is left out of the score; both are counted, never silent.
"""

from __future__ import annotations

import gc
import hashlib
import io
import math
import os
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import Dataset as TorchDataset
from torchvision.transforms.v2 import RandomResizedCrop

from dist_cnn.data.datasets import scan_classes
from dist_cnn.distributed.process_group import main_only
from dist_cnn.data import workers as worker_signals
from dist_cnn.errors import UserError
from dist_cnn.data.loader import Augment, Normalize, _draws, _image_aug, crop_flip, epoch_plan, eval_shard, rank_slice

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect ratios (torchvision's and timm's default)
STATS_SAMPLE = 2000  # training images whose pixels give the normalization mean/std
STATS_SEED = 20_240_601  # the sample does not depend on --seed: the same statistics for every run


# ----------------------------------------------------------------------------- the file index


@dataclass
class FileList:
    """Files of one split: paths relative to the root as one bytes array, labels as int64."""

    root: str
    paths: np.ndarray  # dtype S<n>: ~40 bytes an image, no per-image Python object
    labels: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.paths[i]))


@dataclass
class FolderIndex:
    """What the trainer needs to know of a streamed image folder (the in-memory Dataset's counterpart)."""

    name: str
    classes: list[str]
    train: FileList
    test: FileList
    image_size: int
    in_channels: int = 3
    sample: SampleStats | None = None  # normalization statistics and a few images (attach_sample)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def decoded_bytes(self) -> int:
        return (len(self.train) + len(self.test)) * self.in_channels * self.image_size**2


def _scan_split(root: str, split: str) -> tuple[list[str], list[bytes], list[int]]:
    """Class names, paths relative to root (bytes) and labels, in data.scan_classes' order."""
    classes, files = scan_classes(root, split)
    paths, labels = [], []
    for label, (c, names) in enumerate(zip(classes, files)):
        prefix = os.fsencode(os.path.join(split, c)) + b"/"
        paths += [prefix + os.fsencode(f) for f in names]
        labels += [label] * len(names)
    return classes, paths, labels


def scan_folder(root: str, image_size: int, test_split: str = "test") -> FolderIndex:
    """List train/<class>/* and <test_split>/<class>/* (sorted classes and files), ImageNet's layout too."""
    root = os.path.normpath(root)
    if not os.path.isdir(root):
        raise UserError(f"imagefolder: {root} not found; point --data-dir at a folder holding train/ and {test_split}/")
    classes, train_paths, train_labels = _scan_split(root, "train")
    test_classes, test_paths, test_labels = _scan_split(root, test_split)
    if test_classes != classes:
        differ = sorted(set(classes) ^ set(test_classes))
        raise UserError(f"imagefolder: train/ and {test_split}/ class folders differ ({differ[:5]})")

    def files(paths, labels):
        return FileList(root, np.array(paths, dtype=np.bytes_), np.array(labels, dtype=np.int64))

    return FolderIndex(
        "imagefolder", classes, files(train_paths, train_labels), files(test_paths, test_labels), image_size
    )


def load_index(data_cfg, env) -> FolderIndex:
    """One rank lists the folder (a million files on a shared filesystem), the others receive the list."""
    return main_only(env, lambda: scan_folder(data_cfg.data_dir, data_cfg.image_size, data_cfg.test_split))


# ----------------------------------------------------------------------------- decoding and transforms


def _draw_seed(seed: int, epoch: int, index: int) -> int:
    return (
        int.from_bytes(hashlib.blake2b(struct.pack("<qqq", seed, epoch, index), digest_size=8).digest(), "little") >> 1
    )


def decode_file(path: str) -> torch.Tensor:
    """One file -> uint8 RGB [3, H, W]: torchvision's decoders (JPEG, PNG, WebP, GIF; grayscale, CMYK,
    RGBA and palette become RGB), PIL for the rest (BMP, TIFF, ...). Raises UserError naming the file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"imagefolder: cannot read {path} ({e.strerror or e})") from None
    if not raw:
        raise UserError(f"imagefolder: cannot decode image {path} (empty file)")
    return decode_bytes(raw, path)


def decode_bytes(raw: bytes, path: str) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    try:
        with warnings.catch_warnings():  # deprecated in favour of torchcodec, but the fastest CPU decoders here
            warnings.simplefilter("ignore", DeprecationWarning)
            img = decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)
        if img.dtype == torch.uint8 and img.ndim == 3:
            return img
    except RuntimeError as e:
        if "truncated" in str(e) or "corrupt" in str(e).lower():
            raise UserError(f"imagefolder: cannot decode image {path} ({_last_clause(e)})") from None
    try:  # formats torchvision does not decode, or 16-bit PNGs
        with Image.open(io.BytesIO(raw)) as im:
            return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()
    except Exception as e:
        raise UserError(f"imagefolder: cannot decode image {path} ({_last_clause(e)})") from None


def _last_clause(e: BaseException) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text.rsplit(", ", 1)[-1] if text.startswith("decode_") else text  # drop torchvision's C++ location


def eval_resize(image_size: int, crop_ratio: float) -> int:
    """The shorter side before the centre crop, as torchvision's reference and timm (floor(size / ratio))."""
    return int(math.floor(image_size / crop_ratio))


def eval_transform(img: torch.Tensor, image_size: int, crop_ratio: float) -> torch.Tensor:
    img = TF.resize(img, [eval_resize(image_size, crop_ratio)], antialias=True)
    return TF.center_crop(img, [image_size, image_size])


class CropDraws:
    """RandomResizedCrop's parameters for image `index` in `epoch`: torchvision's own draw, under a
    generator state that depends on (seed, epoch, index) only -- not on the worker or the order."""

    def __init__(self, image_size: int, scale: tuple[float, float], seed: int):
        self.rrc = RandomResizedCrop(image_size, scale=scale, ratio=RATIO, antialias=True)
        self.seed = seed

    def __call__(self, epoch: int, index: int, height: int, width: int) -> tuple[int, int, int, int]:
        shape_only = torch.empty((), dtype=torch.uint8).expand(3, height, width)  # no pixels needed
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also queue seeds for every accelerator
            # backend, formatting a stack trace each time (a third of a sample's decoding time).
            torch.default_generator.manual_seed(_draw_seed(self.seed, epoch, index))
            p = self.rrc.make_params([shape_only])
        return p["top"], p["left"], p["height"], p["width"]


def train_transform(img: torch.Tensor, box: tuple[int, int, int, int], image_size: int) -> torch.Tensor:
    return TF.resized_crop(img, *box, size=[image_size, image_size], antialias=True)


# ----------------------------------------------------------------------------- the dataset


@dataclass
class Sample:
    """What a worker returns for one index. `image` is the final uint8 [3, S, S], or (decode gpu,
    `jpeg` set) the file's bytes, with `box` (training) to crop on the device. `source`: the file read;
    `skipped`: the indices found unreadable on the way."""

    image: torch.Tensor
    label: int
    source: int = -1
    skipped: tuple = ()
    error: str = ""
    jpeg: bool = False
    box: tuple | None = None
    flip: bool = False


class StreamImages(TorchDataset):
    """Map-style: dataset[(epoch, index, flip)] decodes file `index` and applies the split's transform."""

    def __init__(
        self,
        files: FileList,
        *,
        image_size: int,
        train: bool,
        seed: int = 0,
        crop_scale=(0.08, 1.0),
        eval_crop_ratio: float = 0.875,
        skip_bad: bool = False,
        raw_jpeg: bool = False,
    ):
        self.files, self.size, self.train, self.skip_bad = files, image_size, train, skip_bad
        self.crop_ratio, self.raw_jpeg = eval_crop_ratio, raw_jpeg
        self.draws = CropDraws(image_size, crop_scale, seed)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key) -> Sample:
        epoch, index, flip = key
        skipped, j = [], index
        while True:
            try:
                return self._load(epoch, index, j, tuple(skipped), flip)
            except UserError as e:
                if not self.skip_bad:
                    return Sample(torch.zeros(0, dtype=torch.uint8), -1, error=str(e))
                skipped.append(j)
                if not self.train:  # a test image that cannot be read is left out of the score
                    return Sample(torch.zeros(3, self.size, self.size, dtype=torch.uint8), -1, j, tuple(skipped))
                j = (j + 1) % len(self.files)  # the next readable image, the same at every world size
                if j == index:
                    return Sample(
                        torch.zeros(0, dtype=torch.uint8), -1, error="imagefolder: no readable training image"
                    )

    def _load(self, epoch: int, index: int, j: int, skipped: tuple, flip: bool) -> Sample:
        path, label = self.files.path(j), int(self.files.labels[j])
        if self.raw_jpeg:
            with open(path, "rb") as f:
                raw = f.read()
            if raw[:2] == b"\xff\xd8":  # a JPEG: only its size is read here, nvjpeg decodes it
                try:
                    with Image.open(io.BytesIO(raw)) as im:
                        width, height = im.size
                except Exception as e:
                    raise UserError(f"imagefolder: cannot decode image {path} ({_last_clause(e)})") from None
                box = self.draws(epoch, index, height, width) if self.train else None
                return Sample(
                    torch.frombuffer(bytearray(raw), dtype=torch.uint8),
                    label,
                    j,
                    skipped,
                    jpeg=True,
                    box=box,
                    flip=flip,
                )
        img = decode_file(path)
        if self.train:
            img = train_transform(img, self.draws(epoch, index, img.shape[1], img.shape[2]), self.size)
        else:
            img = eval_transform(img, self.size, self.crop_ratio)
        return Sample((img.flip(-1) if flip else img).contiguous(), label, j, skipped)


def collate(samples: list[Sample]) -> dict:
    """A batch: stacked images where decoded, else the list of raw samples (decode gpu)."""
    errors = [s.error for s in samples if s.error]
    batch = {
        "labels": torch.tensor([s.label for s in samples], dtype=torch.int64),
        "skipped": [i for s in samples for i in s.skipped],
        "errors": errors,
    }
    if errors:
        return batch
    if any(s.jpeg for s in samples):
        batch["raw"] = [(s.image, s.jpeg, s.box, s.source, s.flip) for s in samples]
    else:
        batch["images"] = torch.stack([s.image for s in samples])
    return batch


def _local_world() -> int:
    """Ranks on this node (torchrun, or srun's tasks per node)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 0) or os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0] or 1)


def default_workers(workers: int) -> int:
    """-1: the CPUs this process may use, shared among the ranks on this node."""
    if workers >= 0:
        return workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // _local_world())


def _iterate(loader: DataLoader):
    """iter(loader), collecting garbage first when it is about to fork its workers: an abandoned
    iterator of another loader (a run stopped mid-epoch) must not be collected inside a forked worker,
    where its __del__ cannot stop its own workers and says so on stderr."""
    if loader.num_workers and getattr(loader, "_iterator", None) is None:
        gc.collect()
    return worker_signals.start(loader)


def _own_generator() -> torch.Generator:
    """For a DataLoader's worker seeds, which it otherwise draws from the global generator: starting a
    loader must not change the weight initialization or anything else drawn after it (every draw of
    this pipeline is seeded explicitly, so the workers' seeds do not matter)."""
    return torch.Generator().manual_seed(0)


def _loader(dataset, sampler, batch: int, workers: int, device: torch.device) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        drop_last=False,
        generator=_own_generator(),
        worker_init_fn=worker_signals.ignore_stop_signals,
    )


class _Batches:
    """Turns collated batches into uint8 device tensors: raises the first unreadable file as one line,
    records the skipped ones, decodes JPEG bytes with nvjpeg (decode gpu)."""

    def __init__(self, files: FileList, image_size: int, device: torch.device, train: bool, crop_ratio: float):
        self.files, self.size, self.device, self.train, self.crop_ratio = files, image_size, device, train, crop_ratio
        self.skipped: set[int] = set()

    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if batch["errors"]:
            raise UserError(batch["errors"][0] + "; fix or remove it, or pass --skip-bad-images")
        self.skipped.update(batch["skipped"])
        y = batch["labels"].to(self.device, non_blocking=True)
        if "images" in batch:
            return batch["images"].to(self.device, non_blocking=True), y
        return self._gpu_decode(batch["raw"]), y

    def _gpu_decode(self, raw: list) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg

        jpegs = [i for i, r in enumerate(raw) if r[1]]
        out: list = [r[0] for r in raw]  # non-JPEGs arrive decoded and transformed by the worker
        try:
            decoded = (
                decode_jpeg([raw[i][0] for i in jpegs], mode=ImageReadMode.RGB, device=self.device) if jpegs else []
            )
        except RuntimeError:  # one bad file fails the whole batch: decode one by one to name it
            decoded = [self._decode_one(raw[i][0], raw[i][3]) for i in jpegs]
        for i, img in zip(jpegs, decoded):
            img = (
                train_transform(img, raw[i][2], self.size)
                if self.train
                else eval_transform(img, self.size, self.crop_ratio)
            )
            out[i] = img.flip(-1) if raw[i][4] else img
        return torch.stack([o.to(self.device, non_blocking=True) for o in out])

    def _decode_one(self, data: torch.Tensor, source: int) -> torch.Tensor:
        """nvjpeg refused it: the CPU decoders read some JPEGs it does not; else the file is damaged
        (found only now, on the device, so it stops the run even with --skip-bad-images)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            return decode_bytes(data.numpy().tobytes(), self.files.path(source)).to(self.device)


# ----------------------------------------------------------------------------- training pipeline


class _PlanSampler(Sampler):
    """This rank's (epoch, index, flip) keys of the epoch plan from a given step on (DistributedSampler's
    role); the epoch travels with the key because persistent workers keep their own dataset copy."""

    def __init__(self, pipeline: StreamPipeline):
        self.p = pipeline

    def __iter__(self):
        p = self.p
        for step in range(p.start_step, p.steps_per_epoch):
            pos = rank_slice(step, p.batch, p.rank, p.world)
            flips = p.plan["flip"][pos].tolist() if "flip" in p.plan else [False] * p.batch
            for i, flip in zip(p.plan["perm"][pos].tolist(), flips):
                yield p.current_epoch, i, flip

    def __len__(self):
        return (self.p.steps_per_epoch - self.p.start_step) * self.p.batch


class StreamPipeline:
    """The DevicePipeline/LoaderPipeline interface over a FolderIndex's training files."""

    def __init__(
        self,
        files: FileList,
        *,
        batch_per_rank,
        rank,
        world,
        seed,
        aug: Augment,
        normalize: Normalize,
        device,
        workers: int,
        image_size: int,
        crop_scale=(0.08, 1.0),
        skip_bad: bool = False,
        decode: str = "cpu",
        image_aug=None,
    ):
        if decode == "gpu" and device.type != "cuda":
            raise UserError("--decode gpu decodes JPEGs with nvjpeg on a CUDA GPU; on the CPU use --decode cpu")
        self.n, self.batch, self.rank, self.world = len(files), batch_per_rank, rank, world
        self.seed, self.aug, self.image_aug = seed, aug, image_aug
        self.normalize, self.device = normalize, device
        self.steps_per_epoch = self.n // (batch_per_rank * world)
        self.plan, self.start_step, self.current_epoch = None, 0, 0
        self.workers = default_workers(workers)
        dataset = StreamImages(
            files,
            image_size=image_size,
            train=True,
            seed=seed,
            crop_scale=crop_scale,
            skip_bad=skip_bad,
            raw_jpeg=decode == "gpu",
        )
        self.to_device = _Batches(files, image_size, device, train=True, crop_ratio=1.0)
        self.loader = _loader(dataset, _PlanSampler(self), batch_per_rank, self.workers, device)

    @property
    def skipped(self) -> set[int]:
        return self.to_device.skipped

    def epoch(self, epoch: int, start_step: int = 0):
        self.plan = epoch_plan(self.n, self.seed, epoch, self.aug)
        self.start_step, self.current_epoch = start_step, epoch
        for step, batch in enumerate(_iterate(self.loader), start=start_step):
            x, y = self.to_device(batch)
            pos = rank_slice(step, self.batch, self.rank, self.world)
            if self.aug.crop_padding:
                x = crop_flip(x, _draws(self.plan, "shift", pos, self.device), None, self.aug.crop_padding)
            yield self.normalize(_image_aug(self.image_aug, x, epoch, pos)), y


# ----------------------------------------------------------------------------- evaluation and statistics


class _Range(Sampler):
    def __init__(self, indices: range):
        self.indices = indices

    def __iter__(self):
        return ((0, i, False) for i in self.indices)

    def __len__(self):
        return len(self.indices)


class StreamEval:
    """This rank's contiguous shard of the test files, decoded in batches (Resize + CenterCrop).
    Skipped test images come with label -1, which the scorer leaves out and counts."""

    def __init__(
        self,
        files: FileList,
        *,
        rank: int,
        world: int,
        image_size: int,
        eval_crop_ratio: float,
        device,
        workers: int,
        batch_size: int = 250,
        skip_bad: bool = False,
        decode: str = "cpu",
    ):
        self.files, self.n = files, len(files)
        part = eval_shard(len(files), rank, world)
        dataset = StreamImages(
            files,
            image_size=image_size,
            train=False,
            eval_crop_ratio=eval_crop_ratio,
            skip_bad=skip_bad,
            raw_jpeg=decode == "gpu" and device.type == "cuda",
        )
        self.to_device = _Batches(files, image_size, device, train=False, crop_ratio=eval_crop_ratio)
        self.loader = _loader(
            dataset, _Range(range(part.start, part.stop)), batch_size, default_workers(workers), device
        )

    @property
    def skipped(self) -> set[int]:
        return self.to_device.skipped

    def batches(self, normalize: Normalize):
        for batch in _iterate(self.loader):
            x, y = self.to_device(batch)
            yield normalize(x), y


@dataclass
class SampleStats:
    mean: list[float]
    std: list[float]
    x: torch.Tensor  # the first `keep` images of the sample (uint8), for start-up probes
    y: torch.Tensor


def sample_stats(
    files: FileList,
    n: int = STATS_SAMPLE,
    *,
    image_size: int,
    eval_crop_ratio: float,
    workers: int,
    skip_bad: bool = False,
    keep: int = 64,
) -> SampleStats:
    """Per-channel mean/std of an unbiased random sample of n training images (seeded, not the first n
    in class order) through the evaluation transform, accumulated batch by batch; keeps `keep` images."""
    g = torch.Generator().manual_seed(STATS_SEED)
    picks = torch.randperm(len(files), generator=g)[:n].sort().values.tolist()
    dataset = StreamImages(
        files, image_size=image_size, train=False, eval_crop_ratio=eval_crop_ratio, skip_bad=skip_bad
    )
    to_host = _Batches(files, image_size, torch.device("cpu"), train=False, crop_ratio=eval_crop_ratio)
    loader = DataLoader(
        dataset,
        batch_size=50,
        sampler=_Range(picks),
        num_workers=default_workers(workers),
        collate_fn=collate,
        generator=_own_generator(),
        worker_init_fn=worker_signals.ignore_stop_signals,
    )
    total = torch.zeros(2, 3, dtype=torch.float64)  # per channel: sum, sum of squares (pixels in [0, 1])
    count, xs, ys = 0, [], []
    for batch in _iterate(loader):
        x, y = to_host(batch)
        x, y = x[y >= 0], y[y >= 0]  # unreadable ones (skip_bad) left out
        v = x.double().div_(255)
        total += torch.stack([v.sum(dim=(0, 2, 3)), v.square().sum(dim=(0, 2, 3))])
        count += v.numel() // 3
        if sum(len(k) for k in xs) < keep:
            xs.append(x[:keep]), ys.append(y[:keep])
    mean = total[0] / count
    std = ((total[1] - count * mean.square()) / max(count - 1, 1)).clamp(min=0).sqrt()
    return SampleStats(mean.tolist(), std.tolist(), torch.cat(xs)[:keep], torch.cat(ys)[:keep])


# ----------------------------------------------------------------------------- choosing the pipeline


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def fits_in_memory(index: FolderIndex, device: torch.device, local_world: int = 1) -> tuple[bool, str]:
    """Whether the decoded folder fits half the free memory (each rank on a node holds its own copy)."""
    need = index.decoded_bytes()
    budget = available_memory(device) // 2 // (1 if device.type == "cuda" else max(1, local_world))
    where = "GPU memory" if device.type == "cuda" else "RAM"
    gib = 2**30
    return need <= budget, (
        f"{len(index.train) + len(index.test)} images at {index.image_size} px decode to "
        f"{need / gib:.1f} GiB, budget {budget / gib:.1f} GiB (half the free {where}"
        f"{' per rank' if local_world > 1 and device.type != 'cuda' else ''})"
    )


def open_folder(data_cfg, env) -> tuple[FolderIndex | None, str]:
    """The file index to stream, or None to load the dataset into memory; and why, for the log.
    --loader stream streams; auto streams an image folder whose decoded size exceeds the budget."""
    if data_cfg.dataset != "imagefolder" or data_cfg.loader not in ("auto", "stream"):
        return None, ""
    if data_cfg.decode == "gpu" and env.device.type != "cuda":
        raise UserError("--decode gpu decodes JPEGs with nvjpeg on a CUDA GPU; on the CPU use --decode cpu")
    index = load_index(data_cfg, env)
    if data_cfg.loader == "stream":
        return index, "--loader stream"
    fits, why = main_only(env, lambda: fits_in_memory(index, env.device, _local_world()))
    return (None, f"auto: in memory, {why}") if fits else (index, f"auto: streamed, {why}")


def attach_sample(index: FolderIndex, data_cfg, env, keep: int = 256) -> FolderIndex:
    """Rank 0 measures the normalization statistics on a random sample; every rank gets them, with
    `keep` of its images for start-up probes (precision timing, data-dependent initialization)."""

    def measure():
        n = keep if data_cfg.normalize == "half" else STATS_SAMPLE
        s = sample_stats(
            index.train,
            n,
            image_size=index.image_size,
            eval_crop_ratio=data_cfg.eval_crop_ratio,
            workers=data_cfg.workers,
            skip_bad=data_cfg.skip_bad_images,
            keep=keep,
        )
        if data_cfg.normalize == "half":  # the tutorial's Normalize((0.5,)*3, (0.5,)*3)
            s.mean, s.std = [0.5] * 3, [0.5] * 3
        return s

    index.sample = main_only(env, measure)
    return index
