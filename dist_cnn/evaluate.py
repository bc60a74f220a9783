"""Exact test metrics at any world size: each rank scores its own contiguous shard, counts are summed.

No padding and no duplicates (DistributedSampler pads), so the confusion matrix counts every test
image exactly once; the total is checked against the test set's size.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from .distributed import DistEnv, all_reduce_sum
from .loader import Normalize, eval_shard
from .models import tta_logits
from .precision import autocast


def sync_buffers(model: torch.nn.Module, env: DistEnv) -> None:
    """Rank 0's BatchNorm statistics everywhere: each rank's last forward updated its own."""
    if env.initialized:
        for b in model.buffers():
            dist.broadcast(b, src=0)


STOP_CHECK_SECONDS = 1.0  # how often, at most, the ranks vote on a stop during an evaluation


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, num_classes: int,
             normalize: Normalize, env: DistEnv, precision: str, batch_size: int = 1000, tta: int = 0,
             should_stop: Callable[[], bool] | None = None) -> dict | None:
    """The test metrics; None when `should_stop` (a stop signal) became true on any rank.

    Before every batch the ranks agree, in one tiny all_reduce, on whether to stop, on the next
    batch size (rank 0's: sized to take about STOP_CHECK_SECONDS, at most `batch_size`) and on whether
    anyone still has images to score. So a stop never waits for a long evaluation (SLURM kills
    KillWait seconds after SIGTERM, often 30), whatever the model, the device or the load."""
    was_training = model.training
    model.eval()
    sync_buffers(model, env)
    part = eval_shard(len(x), env.rank, env.world_size)
    conf = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=env.device)
    pos, size = part.start, min(batch_size, 16)
    while True:
        vote = torch.tensor([float(should_stop is not None and should_stop()), float(size if env.is_main else 0),
                             float(pos < part.stop)], device=env.device)
        stop, size, busy = (int(v) for v in all_reduce_sum(vote).tolist())
        if stop:
            model.train(was_training)
            return None
        if not busy:
            break
        started = time.perf_counter()
        if pos < part.stop:
            end = min(pos + size, part.stop)
            xb = normalize(x[pos:end].to(env.device, non_blocking=True))
            yb = y[pos:end].to(env.device, non_blocking=True)
            with autocast(precision, env.device):
                pred = tta_logits(model, xb, tta).argmax(1)
            conf += torch.bincount(yb * num_classes + pred, minlength=num_classes * num_classes)
            pos = end
        if env.is_main:  # the vote's .tolist() waited for the device, so this times the batch itself
            seconds = time.perf_counter() - started
            size = max(1, min(batch_size, int(size * STOP_CHECK_SECONDS / max(seconds, 1e-3))))
    conf = all_reduce_sum(conf).view(num_classes, num_classes).cpu()
    model.train(was_training)
    total, correct = int(conf.sum()), int(conf.diag().sum())
    if total != len(x):
        raise RuntimeError(f"evaluation counted {total} test images, the test set has {len(x)}")
    per_class = (conf.diag().double() / conf.sum(1).clamp(min=1).double()).tolist()
    return {"test_accuracy": correct / total, "test_correct": correct, "test_total": total,
            "per_class_accuracy": per_class, "confusion_matrix": conf.tolist()}
