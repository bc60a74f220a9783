"""--shuffle: the order of an epoch's samples over shards.

global (the default): loader.epoch_plan's permutation of all samples; every sample is a random read.
shards:K: the shards in a random order, taken K at a time; the samples of each window of K shards in a
random order. A pure function of (seed, epoch) and the index, so every world size, worker count and
resume sees the same order; a reader touches K shards at a time instead of all of them.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from dist_cnn.errors import UserError

ORDER_SEED_OFFSET = 7_919  # keeps the shard order's draws apart from the epoch plan's


def parse_shuffle(text: str) -> int | None:
    """'global' -> None; 'shards:K' -> K."""
    if text == "global":
        return None
    m = re.fullmatch(r"shards:([0-9]+)", text or "")
    if not m or int(m.group(1)) < 1:
        raise UserError(f"--shuffle: expected global or shards:K with K >= 1 shards a window, got {text!r}")
    return int(m.group(1))


def window_order(shard_of: np.ndarray, num_shards: int, window: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's permutation of sample indices, read `window` shards at a time."""
    g = torch.Generator().manual_seed((seed * ORDER_SEED_OFFSET + epoch) % 2**63)
    rank_of_shard = torch.empty(num_shards, dtype=torch.int64)
    rank_of_shard[torch.randperm(num_shards, generator=g)] = torch.arange(num_shards)
    windows = (rank_of_shard[torch.from_numpy(shard_of.astype(np.int64))] // window).numpy()
    shuffled = torch.randperm(len(shard_of), generator=g).numpy()
    # a stable sort by window keeps the random order inside each window
    return torch.from_numpy(shuffled[np.argsort(windows[shuffled], kind="stable")])


class WindowOrder:
    """order(seed, epoch) for the stream pipeline: picklable, holds only the shard of each sample."""

    def __init__(self, shard_of: np.ndarray, num_shards: int, window: int):
        self.shard_of, self.num_shards, self.window = shard_of, num_shards, window

    def __call__(self, seed: int, epoch: int) -> torch.Tensor:
        return window_order(self.shard_of, self.num_shards, self.window, seed, epoch)


def make_order(samples, shuffle: str) -> WindowOrder | None:
    """None (the epoch plan's global permutation) or the shards:K order of a shards split."""
    window = parse_shuffle(shuffle)
    return None if window is None else WindowOrder(samples.index.shard, samples.num_shards, window)
