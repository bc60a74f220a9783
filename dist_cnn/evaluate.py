"""Exact test metrics at any world size: each rank scores its own contiguous shard, counts are summed.

No padding and no duplicates (DistributedSampler pads), so the confusion matrix counts every test
image exactly once; the total is checked against the test set's size.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from .distributed import DistEnv, all_reduce_sum
from .loader import Normalize, eval_shard
from .models import tta_logits
from .precision import autocast


def _any_rank(flag: bool, env: DistEnv) -> bool:
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=env.device)).item())


def sync_buffers(model: torch.nn.Module, env: DistEnv) -> None:
    """Rank 0's BatchNorm statistics everywhere: each rank's last forward updated its own."""
    if env.initialized:
        for b in model.buffers():
            dist.broadcast(b, src=0)


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, num_classes: int,
             normalize: Normalize, env: DistEnv, precision: str, batch_size: int = 1000, tta: int = 0,
             should_stop: Callable[[], bool] | None = None) -> dict | None:
    """The test metrics; None when `should_stop` (a stop signal) became true on any rank: the ranks
    agree on it before every batch (one tiny all_reduce), so a stop never waits for a long evaluation."""
    was_training = model.training
    model.eval()
    sync_buffers(model, env)
    part = eval_shard(len(x), env.rank, env.world_size)
    conf = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=env.device)
    # Every rank runs the same number of rounds (shards differ by at most one image), so the
    # per-batch stop vote always has all ranks.
    rounds = -(-(-(-len(x) // env.world_size)) // batch_size)
    for k in range(rounds):
        if should_stop is not None and _any_rank(should_stop(), env):
            model.train(was_training)
            return None
        i = part.start + k * batch_size
        if i >= part.stop:
            continue
        xb = normalize(x[i:min(i + batch_size, part.stop)].to(env.device, non_blocking=True))
        yb = y[i:min(i + batch_size, part.stop)].to(env.device, non_blocking=True)
        with autocast(precision, env.device):
            pred = tta_logits(model, xb, tta).argmax(1)
        conf += torch.bincount(yb * num_classes + pred, minlength=num_classes * num_classes)
    conf = all_reduce_sum(conf).view(num_classes, num_classes).cpu()
    model.train(was_training)
    total, correct = int(conf.sum()), int(conf.diag().sum())
    if total != len(x):
        raise RuntimeError(f"evaluation counted {total} test images, the test set has {len(x)}")
    per_class = (conf.diag().double() / conf.sum(1).clamp(min=1).double()).tolist()
    return {"test_accuracy": correct / total, "test_correct": correct, "test_total": total,
            "per_class_accuracy": per_class, "confusion_matrix": conf.tolist()}
