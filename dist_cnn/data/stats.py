"""Normalization statistics of an image folder, the same whichever pipeline reads it: the per-channel
mean and std of a seeded random sample of training images (not the first ones: a folder lists its
images class by class), as the evaluation transform prepares them, summed in float64 in batches of
STATS_BATCH in index order."""

from __future__ import annotations

import torch

STATS_SAMPLE = 2000  # training images whose pixels give the normalization mean/std
STATS_SEED = 20_240_601  # the sample does not depend on --seed: the same statistics for every run
STATS_BATCH = 50
PROBE_IMAGES = 256  # of the sample, kept for start-up probes (source.DataSource.probe)


def init_sample(n: int, k: int, seed: int) -> torch.Tensor:
    """Indices of the k training images a data-initialized layer sees: a uniform sample without
    replacement (airbench takes the first 5,000 of a shuffled set; an image folder is sorted by class),
    the same on every rank for a given seed."""
    g = torch.Generator().manual_seed(seed + 0x5EED)
    return torch.randperm(n, generator=g)[:k].sort().values


def stats_picks(n_total: int, n: int = STATS_SAMPLE) -> list[int]:
    """The sampled training indices, sorted."""
    g = torch.Generator().manual_seed(STATS_SEED)
    return torch.randperm(n_total, generator=g)[:n].sort().values.tolist()


class Moments:
    """Per-channel sums of pixels and squares (pixels in [0, 1]) over uint8 batches [B, C, H, W]."""

    def __init__(self, channels: int = 3):
        self.total = torch.zeros(2, channels, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        v = x.double().div_(255)
        self.total += torch.stack([v.sum(dim=(0, 2, 3)), v.square().sum(dim=(0, 2, 3))])
        self.count += v.numel() // v.shape[1] if v.numel() else 0

    def mean_std(self) -> tuple[list[float], list[float]]:
        count = max(self.count, 1)
        mean = self.total[0] / count
        var = (self.total[1] - count * mean.square()) / max(count - 1, 1)
        return mean.tolist(), var.clamp(min=0).sqrt().clamp(min=1e-3).tolist()
