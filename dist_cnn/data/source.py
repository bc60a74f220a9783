"""The one interface every dataset implements, and the recipe that prepares its images.

Every consumer -- the trainer, `dist-cnn eval`, `predict`, `export`, the Python API and the benchmarks --
reads data through `DataSource` only; which kind of source it is (tensors in memory, files streamed from
a folder, samples streamed from shards) is decided once, in `dist_cnn.data.open_source`, and never
tested again outside this package.

A source is:
- its size (`train_size`, `test_size`), its `classes`, `in_channels` and `image_size`;
- `train_batches(...)`: a `TrainBatches` whose `epoch(epoch, start_step)` yields this rank's slice of
  each global batch from a position on, as normalized float batches on the device. The epoch's order
  is loader.epoch_plan(seed, epoch): the same at every world size, and a resume at step k replays
  exactly what an uninterrupted run saw;
- `eval_batches(...)`: this rank's contiguous shard of the test set (loader.eval_shard), every test
  sample scored once at any world size; label -1 marks a sample left out (unreadable, skip_bad_images);
- `normalization(mode)`: per-channel mean and std in [0, 1] units;
- `probe(n)`: n uint8 training images and labels, the same on every rank and for every loader, for
  start-up measurements (precision timing, data-dependent initialization);
- checkpointable state: the trainer stores the position (epoch, step in the epoch) and
  `skipped_names()`, the samples found unreadable so far; `train_size` is checked on resume.

A streamed source is N encoded samples read by index: any `SampleReader` (an image folder's files,
members of tar shards, ...) plugs into `dist_cnn.data.stream.StreamSource`, which brings the epoch
plan, the workers, the one decoder (`dist_cnn.data.decode`), the recipe's transforms, exact
evaluation, skipping of unreadable samples and the normalization sample.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from dist_cnn.config import DataConfig, parse_crop_scale
from dist_cnn.errors import UserError

DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL's Image.MAX_IMAGE_PIXELS: 1 GiB of 24-bit RGB / 4 / 3


@runtime_checkable
class SampleReader(Protocol):
    """N encoded samples of one split, addressable by index (an image folder, tar shards, ...).

    `read(i)` returns the sample's encoded image bytes (JPEG, PNG, ...), or raises UserError naming
    the sample when its storage cannot be read; decoding is the pipeline's. `label(i)` is its class in
    [0, len(classes)); `name(i)` a display name for messages and the skipped list (a path, SHARD:KEY).
    A reader is pickled into each DataLoader worker: keep it small (arrays, not a Python object per
    sample) and open files or connections lazily, per process."""

    classes: list[str]

    def __len__(self) -> int: ...

    def read(self, i: int) -> bytes: ...

    def label(self, i: int) -> int: ...

    def name(self, i: int) -> str: ...


@dataclass(frozen=True)
class Recipe:
    """How one image becomes a uint8 [C, image_size, image_size] tensor: the same for every source and
    loader. Evaluation: `eval_resize` "stretch" resizes to image_size x image_size (nothing happens to an
    image already that size), "center-crop" resizes the shorter side to floor(image_size /
    eval_crop_ratio) and takes the centre square. Training: `train_crop` "none" prepares each image as
    evaluation does (then the batch augmentations: crop_padding, flip, ...); "random-resized" takes
    torchvision's RandomResizedCrop(image_size, scale=crop_scale, ratio=(3/4, 4/3)) of the decoded
    image, drawn from (seed, epoch, index)."""

    image_size: int
    train_crop: str = "none"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    eval_resize: str = "stretch"
    eval_crop_ratio: float = 0.875
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS  # 0: no limit

    @property
    def shorter_side(self) -> int:
        """The shorter side before the centre crop (center-crop), as torchvision's reference and timm."""
        return int(math.floor(self.image_size / self.eval_crop_ratio))

    def describe(self) -> str:
        """The evaluation transform in words (export metadata, docs)."""
        if self.eval_resize == "center-crop":
            return (
                f"resize the shorter side to floor({self.image_size} / {self.eval_crop_ratio}) = "
                f"{self.shorter_side} px (bilinear, antialiased), center-crop {self.image_size}x{self.image_size}"
            )
        return f"resize to {self.image_size}x{self.image_size} (bilinear, antialiased; none when already that size)"


def recipe_of(d: DataConfig) -> Recipe:
    return Recipe(
        d.image_size, d.train_crop, parse_crop_scale(d.crop_scale), d.eval_resize, d.eval_crop_ratio, d.max_image_pixels
    )


def upgrade_stored_config(data: dict, loader: str | None) -> dict:
    """A run directory's config["data"] as this version reads it. Runs from before the recipe options
    (no "eval_resize" stored) were prepared by their loader: streamed ones with RandomResizedCrop and
    a resize + centre crop at evaluation, in-memory ones stretched to the square size."""
    if "eval_resize" in data or "train_crop" in data:
        return data
    if loader == "stream":
        return {**data, "train_crop": "random-resized", "eval_resize": "center-crop"}
    return {**data, "train_crop": "none", "eval_resize": "stretch"}


class TrainBatches(Protocol):
    """One rank's training pipeline over a source."""

    n: int  # training samples
    steps_per_epoch: int  # global batches per epoch (the last partial one is dropped)
    kind: str  # "device", "dataloader" or "stream": for the logs, summary and checkpoints

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class DataSource(ABC):
    """A dataset as the trainer and the commands see it (module docstring)."""

    name: str
    classes: list[str]
    kind: str = "source"  # "memory", "stream": for logs; never branch on it outside this package
    adaptive_eval: bool = False  # eval_batches reads a callable batch size before each batch

    @property
    @abstractmethod
    def in_channels(self) -> int: ...

    @property
    @abstractmethod
    def image_size(self) -> int: ...

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    @abstractmethod
    def train_size(self) -> int: ...

    @property
    @abstractmethod
    def test_size(self) -> int: ...

    @abstractmethod
    def normalization(self, mode: str) -> tuple[list[float], list[float]]:
        """Per-channel (mean, std) in [0, 1] units; mode "half" is 0.5/0.5 (the tutorial's)."""

    @abstractmethod
    def probe(self, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """n uint8 training images [n, C, S, S] and their labels, on the CPU (fewer when smaller)."""

    @abstractmethod
    def train_batches(
        self,
        *,
        loader: str,
        batch_per_rank: int,
        rank: int,
        world: int,
        seed: int,
        aug,
        normalize,
        device: torch.device,
        workers: int,
        image_aug=None,
    ) -> TrainBatches:
        """`loader` is the --loader asked for ("auto" lets the source choose); the recipe never changes."""

    @abstractmethod
    def eval_batches(
        self,
        *,
        rank: int,
        world: int,
        normalize,
        device: torch.device,
        batch_size: int | Callable[[], int],
        workers: int,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's contiguous test shard as (normalized x, y) batches; batch_size may be a callable
        read before each batch (in-memory sources size batches to the stop-check interval)."""

    @abstractmethod
    def test_label(self, i: int) -> int:
        """Test sample i's class."""

    def test_name(self, i: int) -> str:
        """Test sample i's display name (a file path where there is one), for per-sample outputs."""
        return f"{self.name}:test:{i}"

    def skipped_names(self) -> set[str]:
        """Samples found unreadable so far on this rank (skip_bad_images), by name."""
        return set()

    def describe(self) -> str:
        """One line for the log: what is read, and how."""
        return f"{self.name}: {self.train_size} training and {self.test_size} test images"


def check_recipe(recipe: Recipe, source_kind: str) -> None:
    """A recipe the in-memory tensors cannot follow is refused, never silently changed."""
    if recipe.train_crop == "random-resized" and source_kind == "memory":
        raise UserError(
            "--train-crop random-resized crops the decoded image files: use --dataset imagefolder with "
            "--loader stream or auto (in-memory tensors hold images already at --image-size)"
        )
