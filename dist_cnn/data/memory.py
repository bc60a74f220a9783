"""A source of uint8 image tensors in memory (synthetic, CIFAR, Fashion-MNIST, a decoded image folder,
the Python API's data), fed by the device pipeline or a DataLoader (loader.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_cnn.data.loader import DevicePipeline, LoaderPipeline, eval_shard, normalization_stats
from dist_cnn.data.source import DataSource
from dist_cnn.data.stats import PROBE_IMAGES, STATS_BATCH, Moments, init_sample, stats_picks
from dist_cnn.errors import UserError


def fits_on_device(x: torch.Tensor, device: torch.device) -> bool:
    if device.type != "cuda":
        return True  # already in RAM: the device pipeline just indexes it
    free, _ = torch.cuda.mem_get_info(device)
    return x.numel() * 2 < free * 0.5  # uint8 data plus room for the model


@dataclass
class InMemory(DataSource):
    name: str
    classes: list[str]
    train_x: torch.Tensor  # uint8 [N, C, H, W], contiguous
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor  # uint8 [M, C, H, W]
    test_y: torch.Tensor  # int64 [M]
    # An image folder's statistics come from the sample a streamed read of it would measure
    # (stats.py), so the loader does not change the normalization; other datasets use every image.
    folder_stats: bool = False
    test_names: list[str] | None = None  # an image folder's test files, for per-sample outputs

    kind = "memory"
    adaptive_eval = True  # a batch is a slice: sized to the stop-check interval (train.evaluate)

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_x.shape[2]

    @property
    def train_size(self) -> int:
        return len(self.train_x)

    @property
    def test_size(self) -> int:
        return len(self.test_x)

    def normalization(self, mode: str) -> tuple[list[float], list[float]]:
        if mode == "half" or not self.folder_stats:
            return normalization_stats(self.train_x, mode)
        picks, moments = stats_picks(len(self.train_x)), Moments(self.in_channels)
        for i in range(0, len(picks), STATS_BATCH):
            moments.add(self.train_x[picks[i : i + STATS_BATCH]])
        return moments.mean_std()

    def probe(self, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A uniform sample (init_sample); an image folder's is the streamed read's (stats.py)."""
        if self.folder_stats:
            idx = torch.tensor(stats_picks(len(self.train_x))[: min(n, PROBE_IMAGES)], dtype=torch.int64)
        else:
            idx = init_sample(len(self.train_x), n, seed)
        return self.train_x[idx], self.train_y[idx]

    def test_label(self, i: int) -> int:
        return int(self.test_y[i])

    def test_name(self, i: int) -> str:
        return self.test_names[i] if self.test_names else super().test_name(i)

    def train_batches(
        self, *, loader, batch_per_rank, rank, world, seed, aug, normalize, device, workers, image_aug=None
    ):
        if loader == "stream":
            raise UserError("--loader stream reads image files: use --dataset imagefolder")
        kind = loader if loader != "auto" else ("device" if fits_on_device(self.train_x, device) else "dataloader")
        kw = dict(
            batch_per_rank=batch_per_rank,
            rank=rank,
            world=world,
            seed=seed,
            aug=aug,
            normalize=normalize,
            device=device,
            image_aug=image_aug,
        )
        if kind == "device":
            pipe = DevicePipeline(self.train_x, self.train_y, **kw)
        else:
            pipe = LoaderPipeline(self.train_x, self.train_y, workers=workers, **kw)
        pipe.kind = kind
        return pipe

    def eval_batches(self, *, rank, world, normalize, device, batch_size, workers):
        part = eval_shard(len(self.test_x), rank, world)
        pos = part.start
        while pos < part.stop:
            end = min(pos + (batch_size() if callable(batch_size) else batch_size), part.stop)
            x, y = self.test_x[pos:end], self.test_y[pos:end]
            yield normalize(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
            pos = end
