"""Streamed sources: each rank decodes only its own samples, per batch, in DataLoader workers.

For datasets too large to decode into memory (ImageNet: 1.28 M JPEGs). A StreamSource reads any
source.SampleReader (an image folder's files, members of tar shards); nothing is cached: a process
holds the reader's arrays and the batches in flight, so its memory does not grow with the data.

The guarantees of the in-memory pipelines carry over, and so do their batches:
- an epoch's order is loader.epoch_plan(seed, epoch); global batch i is plan positions [i*B, (i+1)*B)
  and rank r takes the r-th slice of it (loader.rank_slice), so resuming at step k replays exactly;
- a worker decodes a sample (decode.decode) and prepares it by the recipe (transform.py): the
  evaluation transform, or a RandomResizedCrop drawn from (seed, epoch, index); padded crops and flips
  are the plan's draws on the whole batch, as in memory -- with the default recipe the uint8 batches
  are bit-equal to the in-memory pipelines';
- evaluation reads this rank's contiguous shard (loader.eval_shard) and scores each test sample once.

Unreadable samples (zero bytes, truncated, not an image, too many pixels) are found when a worker
decodes them: the run stops with one line naming the sample. With skip_bad_images a training sample is
replaced by the next readable one in index order (a pure function of the index, so every world size
and every resume sees the same replacement) and a test sample is left out of the score; both are
counted, never silent.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data import Dataset as TorchDataset

from dist_cnn.data import workers as worker_signals
from dist_cnn.data.decode import check_pixels, decode, image_size_of
from dist_cnn.data.loader import (
    Augment,
    Normalize,
    plan_draws,
    apply_image_aug,
    crop_flip,
    draws_on,
    epoch_plan,
    eval_shard,
    image_keys,
    per_image,
    rank_slice,
)
from dist_cnn.data.source import DataSource, Recipe, SampleReader
from dist_cnn.data.stats import STATS_BATCH, STATS_SAMPLE, Moments, stats_picks
from dist_cnn.data.transform import CropDraws, eval_transform, resized_crop
from dist_cnn.errors import UserError

# ----------------------------------------------------------------------------- one sample


@dataclass
class Sample:
    """What a worker returns for one index. `image` is the final uint8 [C, S, S], or (decode gpu,
    `jpeg` set) the file's bytes, with `box` (training crop) to apply on the device. `source`: the
    index read; `skipped`: the indices found unreadable on the way."""

    image: torch.Tensor
    label: int
    source: int = -1
    skipped: tuple = ()
    error: str = ""
    jpeg: bool = False
    box: tuple | None = None


class StreamImages(TorchDataset):
    """Map-style: dataset[(epoch, index)] decodes sample `index` and prepares it by the recipe; a key of
    loader.image_keys also crops, flips and augments it (loader.per_image)."""

    def __init__(
        self,
        reader: SampleReader,
        recipe: Recipe,
        *,
        train: bool,
        seed: int = 0,
        skip_bad: bool = False,
        raw_jpeg: bool = False,
        channels: int = 3,
        pad: int = 0,
        image_aug=None,
    ):
        self.reader, self.recipe, self.train, self.skip_bad = reader, recipe, train, skip_bad
        self.raw_jpeg, self.channels, self.pad, self.image_aug = raw_jpeg, channels, pad, image_aug
        self.crop = train and recipe.train_crop == "random-resized"
        self.draws = CropDraws(recipe.image_size, recipe.crop_scale, seed)

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, key) -> Sample:
        sample = self._sample(*key[:2])
        if len(key) > 2 and not sample.error:
            sample.image = per_image(sample.image, key, self.pad, self.image_aug)
        return sample

    def _sample(self, epoch: int, index: int) -> Sample:
        skipped, j = [], index
        while True:
            try:
                return self._load(epoch, index, j, tuple(skipped))
            except UserError as e:
                if not self.skip_bad or getattr(e, "fatal", False):  # fatal: the dataset, not one image
                    return Sample(torch.zeros(0, dtype=torch.uint8), -1, error=str(e))
                skipped.append(j)
                if not self.train:  # a test sample that cannot be read is left out of the score
                    size = self.recipe.image_size
                    return Sample(torch.zeros(self.channels, size, size, dtype=torch.uint8), -1, j, tuple(skipped))
                j = (j + 1) % len(self.reader)  # the next readable sample, the same at every world size
                if j == index:
                    return Sample(torch.zeros(0, dtype=torch.uint8), -1, error="no readable training image")

    def _load(self, epoch: int, index: int, j: int, skipped: tuple) -> Sample:
        raw, label, name = self.reader.read(j), self.reader.label(j), self.reader.name(j)
        if self.raw_jpeg and raw[:2] == b"\xff\xd8":  # a JPEG: only its header is read here, nvjpeg decodes it
            width, height, _ = image_size_of(raw, name)
            check_pixels(width, height, name, self.recipe.max_pixels)
            box = self.draws(epoch, index, height, width) if self.crop else None
            return Sample(torch.frombuffer(bytearray(raw), dtype=torch.uint8), label, j, skipped, jpeg=True, box=box)
        img = decode(raw, name, self.channels, self.recipe.max_pixels)
        if self.crop:
            img = resized_crop(img, self.draws(epoch, index, img.shape[1], img.shape[2]), self.recipe.image_size)
        else:
            img = eval_transform(img, self.recipe)
        return Sample(img.contiguous(), label, j, skipped)


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
        batch["raw"] = [(s.image, s.jpeg, s.box, s.source) for s in samples]
    else:
        batch["images"] = torch.stack([s.image for s in samples])
    return batch


# ----------------------------------------------------------------------------- DataLoader plumbing


def local_world() -> int:
    """Ranks on this node (torchrun, or srun's tasks per node)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 0) or os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0] or 1)


def default_workers(workers: int) -> int:
    """-1: the CPUs this process may use, shared among the ranks on this node."""
    if workers >= 0:
        return workers
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // local_world())


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


def _loader(dataset, sampler, batch: int, workers: int, device: torch.device, persistent: bool = True) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=persistent and workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        drop_last=False,
        generator=_own_generator(),
        worker_init_fn=worker_signals.ignore_stop_signals,
    )


class _Batches:
    """Turns collated batches into uint8 device tensors: raises the first unreadable sample as one
    line, records the skipped ones, decodes JPEG bytes with nvjpeg (decode gpu)."""

    def __init__(self, reader: SampleReader, recipe: Recipe, device: torch.device):
        self.reader, self.recipe, self.device = reader, recipe, device
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
            box = raw[i][2]
            out[i] = resized_crop(img, box, self.recipe.image_size) if box else eval_transform(img, self.recipe)
        return torch.stack([o.to(self.device, non_blocking=True) for o in out])

    def _decode_one(self, data: torch.Tensor, source: int) -> torch.Tensor:
        """nvjpeg refused it: the CPU decoder reads some JPEGs it does not; else the sample is damaged
        (found only now, on the device, so it stops the run even with --skip-bad-images)."""
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            name = self.reader.name(source)
            return decode(data.numpy().tobytes(), name, 3, self.recipe.max_pixels).to(self.device)


# ----------------------------------------------------------------------------- training pipeline


class _PlanSampler(Sampler):
    """This rank's (epoch, index) keys of the epoch plan from a given step on (DistributedSampler's
    role); the epoch travels with the key because persistent workers keep their own dataset copy."""

    def __init__(self, pipeline: StreamPipeline):
        self.p = pipeline

    def __iter__(self):
        p = self.p
        for step in range(p.start_step, p.steps_per_epoch):
            pos = rank_slice(step, p.batch, p.rank, p.world)
            if p.in_workers:
                yield from image_keys(p.plan, pos, p.current_epoch)
            else:
                for i in p.plan["perm"][pos].tolist():
                    yield p.current_epoch, i

    def __len__(self):
        return (self.p.steps_per_epoch - self.p.start_step) * self.p.batch


class StreamPipeline:
    """source.TrainBatches over a SampleReader's training samples."""

    kind = "stream"

    def __init__(
        self,
        reader: SampleReader,
        recipe: Recipe,
        *,
        batch_per_rank,
        rank,
        world,
        seed,
        aug: Augment,
        normalize: Normalize,
        device,
        workers: int,
        skip_bad: bool = False,
        decode: str = "cpu",
        image_aug=None,
        order=None,
    ):
        """order(seed, epoch) -> the epoch's permutation instead of epoch_plan's (--shuffle shards:K)."""
        if decode == "gpu" and device.type != "cuda":
            raise UserError("--decode gpu decodes JPEGs with nvjpeg on a CUDA GPU; on the CPU use --decode cpu")
        self.n, self.batch, self.rank, self.world = len(reader), batch_per_rank, rank, world
        self.seed, self.aug, self.image_aug, self.order = seed, aug, image_aug, order
        self.normalize, self.device = normalize, device
        self.steps_per_epoch = self.n // (batch_per_rank * world)
        self.plan, self.start_step, self.current_epoch = None, 0, 0
        self.workers = default_workers(workers)
        # the per-image transforms in the workers (loader's docstring), unless nvjpeg decodes on the device
        self.in_workers = bool(image_aug) and decode != "gpu"
        dataset = StreamImages(
            reader,
            recipe,
            train=True,
            seed=seed,
            skip_bad=skip_bad,
            raw_jpeg=decode == "gpu",
            pad=aug.crop_padding,
            image_aug=image_aug,
        )
        self.to_device = _Batches(reader, recipe, device)
        self.loader = _loader(dataset, _PlanSampler(self), batch_per_rank, self.workers, device)

    @property
    def skipped(self) -> set[int]:
        return self.to_device.skipped

    def epoch(self, epoch: int, start_step: int = 0):
        perm = None if self.order is None else self.order(self.seed, epoch)
        self.plan = epoch_plan(self.n, self.seed, epoch, self.aug, perm)
        self.start_step, self.current_epoch = start_step, epoch
        draws = draws_on(self.plan, self.device)
        for step, batch in enumerate(_iterate(self.loader), start=start_step):
            x, y = self.to_device(batch)
            if not self.in_workers:  # else cropped, flipped and augmented by the workers
                pos = rank_slice(step, self.batch, self.rank, self.world)
                x = crop_flip(x, plan_draws(draws, "shift", pos), plan_draws(draws, "flip", pos), self.aug.crop_padding)
                x = apply_image_aug(self.image_aug, x, epoch, pos)
            yield self.normalize(x), y


# ----------------------------------------------------------------------------- evaluation and statistics


class _Keys(Sampler):
    def __init__(self, indices):
        self.indices = indices

    def __iter__(self):
        return ((0, i) for i in self.indices)

    def __len__(self):
        return len(self.indices)


class StreamEval:
    """This rank's contiguous shard of the test samples, decoded in batches (the evaluation transform).
    Skipped test samples come with label -1, which the scorer leaves out and counts."""

    def __init__(
        self,
        reader: SampleReader,
        recipe: Recipe,
        *,
        rank: int,
        world: int,
        device,
        workers: int,
        batch_size: int = 250,
        skip_bad: bool = False,
        decode: str = "cpu",
    ):
        part = eval_shard(len(reader), rank, world)
        gpu = decode == "gpu" and device.type == "cuda"
        dataset = StreamImages(reader, recipe, train=False, skip_bad=skip_bad, raw_jpeg=gpu)
        self.to_device = _Batches(reader, recipe, device)
        self.loader = _loader(dataset, _Keys(range(part.start, part.stop)), batch_size, default_workers(workers), device)

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
    reader: SampleReader, recipe: Recipe, n: int, *, workers: int, skip_bad: bool = False, keep: int = 64
) -> SampleStats:
    """Per-channel mean/std of the seeded random sample of n training samples (stats.py) through the
    evaluation transform; keeps the first `keep` images."""
    dataset = StreamImages(reader, recipe, train=False, skip_bad=skip_bad)
    to_host = _Batches(reader, recipe, torch.device("cpu"))
    loader = _loader(
        dataset, _Keys(stats_picks(len(reader), n)), STATS_BATCH, default_workers(workers), torch.device("cpu"), False
    )
    moments, xs, ys = Moments(), [], []
    for batch in _iterate(loader):
        x, y = to_host(batch)
        x, y = x[y >= 0], y[y >= 0]  # unreadable ones (skip_bad) left out
        moments.add(x)
        if sum(len(k) for k in xs) < keep:
            xs.append(x[:keep]), ys.append(y[:keep])
    mean, std = moments.mean_std()
    return SampleStats(mean, std, torch.cat(xs)[:keep], torch.cat(ys)[:keep])


# ----------------------------------------------------------------------------- the source


class StreamSource(DataSource):
    """A source.DataSource over two SampleReaders (train, test), decoded by workers as batches go."""

    kind = "stream"

    def __init__(
        self,
        name: str,
        train: SampleReader,
        test: SampleReader,
        recipe: Recipe,
        *,
        skip_bad: bool = False,
        decode: str = "cpu",
        channels: int = 3,
        order=None,
    ):
        """order(seed, epoch): the training order, when not epoch_plan's global permutation."""
        self.name, self.classes = name, list(train.classes)
        self.order = order
        self.train, self.test, self.recipe = train, test, recipe
        self.skip_bad, self.decode, self.channels = skip_bad, decode, channels
        self.sample: SampleStats | None = None
        self._pipeline: StreamPipeline | None = None
        self._eval: tuple | None = None  # (key, StreamEval): its workers are kept between evaluations

    @property
    def in_channels(self) -> int:
        return self.channels

    @property
    def image_size(self) -> int:
        return self.recipe.image_size

    @property
    def train_size(self) -> int:
        return len(self.train)

    @property
    def test_size(self) -> int:
        return len(self.test)

    def measure(self, mode: str, workers: int, keep: int = 256) -> SampleStats:
        """The normalization sample (stats.py), with `keep` images for probes; run by one rank
        (process_group.rank0_only), then attach()ed on every rank."""
        n = keep if mode == "half" else STATS_SAMPLE
        s = sample_stats(self.train, self.recipe, n, workers=workers, skip_bad=self.skip_bad, keep=keep)
        if mode == "half":  # the tutorial's Normalize((0.5,)*3, (0.5,)*3)
            s.mean, s.std = [0.5] * 3, [0.5] * 3
        return s

    def attach(self, sample: SampleStats) -> StreamSource:
        self.sample = sample
        return self

    def normalization(self, mode: str) -> tuple[list[float], list[float]]:
        if mode == "half":
            return [0.5] * self.channels, [0.5] * self.channels
        return list(self.sample.mean), list(self.sample.std)

    def probe(self, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sample is None:  # opened without measuring (eval of a checkpoint that holds its statistics)
            return torch.empty(0, self.channels, 0, 0, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
        return self.sample.x[:n], self.sample.y[:n]

    def train_batches(
        self, *, loader, batch_per_rank, rank, world, seed, aug, normalize, device, workers, image_aug=None
    ) -> StreamPipeline:
        self._pipeline = StreamPipeline(
            self.train,
            self.recipe,
            batch_per_rank=batch_per_rank,
            rank=rank,
            world=world,
            seed=seed,
            aug=aug,
            normalize=normalize,
            device=device,
            workers=workers,
            skip_bad=self.skip_bad,
            decode=self.decode,
            image_aug=image_aug,
            order=self.order,
        )
        return self._pipeline

    def eval_batches(self, *, rank, world, normalize, device, batch_size, workers):
        size = batch_size() if callable(batch_size) else batch_size
        key = (rank, world, str(device), size, workers)
        if self._eval is None or self._eval[0] != key:
            self._eval = key, StreamEval(
                self.test,
                self.recipe,
                rank=rank,
                world=world,
                device=device,
                workers=workers,
                batch_size=size,
                skip_bad=self.skip_bad,
                decode=self.decode,
            )
        return self._eval[1].batches(normalize)

    def test_label(self, i: int) -> int:
        return self.test.label(i)

    def test_name(self, i: int) -> str:
        return self.test.name(i)

    def skipped_names(self) -> set[str]:
        train = self._pipeline.skipped if self._pipeline else set()
        test = self._eval[1].skipped if self._eval else set()
        return {self.train.name(i) for i in train} | {self.test.name(i) for i in test}

    def describe(self) -> str:
        return f"{self.name}: {self.train_size} training and {self.test_size} test samples, streamed"

