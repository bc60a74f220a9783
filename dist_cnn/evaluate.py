"""Exact test metrics at any world size: each rank scores its own contiguous shard, counts are summed.

No padding and no duplicates (DistributedSampler pads), so the confusion matrix counts every test
image exactly once; the total is checked against the test set's size.
"""
from __future__ import annotations

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


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, num_classes: int,
             normalize: Normalize, env: DistEnv, precision: str, batch_size: int = 1000, tta: int = 0) -> dict:
    """In-memory test tensors: this rank's contiguous shard, batch by batch."""
    part = eval_shard(len(x), env.rank, env.world_size)
    batches = ((normalize(x[i:min(i + batch_size, part.stop)].to(env.device, non_blocking=True)),
                y[i:min(i + batch_size, part.stop)].to(env.device, non_blocking=True))
               for i in range(part.start, part.stop, batch_size))
    return evaluate_batches(model, batches, len(x), num_classes=num_classes, env=env, precision=precision,
                            tta=tta)


@torch.no_grad()
def evaluate_batches(model: torch.nn.Module, batches, n: int, *, num_classes: int, env: DistEnv, precision: str,
                     tta: int = 0) -> dict:
    """Score this rank's (normalized x, y) batches of its shard; the counts of all ranks are summed and
    must cover the n test images. Label -1 marks an image left out (unreadable, --skip-bad-images)."""
    was_training = model.training
    model.eval()
    sync_buffers(model, env)
    conf = torch.zeros(num_classes * num_classes + 1, dtype=torch.int64, device=env.device)  # + left out
    for xb, yb in batches:
        with autocast(precision, env.device):
            pred = tta_logits(model, xb, tta).argmax(1)
        cell = torch.where(yb >= 0, yb * num_classes + pred, num_classes * num_classes)
        conf += torch.bincount(cell, minlength=num_classes * num_classes + 1)
    conf = all_reduce_sum(conf).cpu()
    left_out, conf = int(conf[-1]), conf[:-1].view(num_classes, num_classes)
    model.train(was_training)
    total, correct = int(conf.sum()), int(conf.diag().sum())
    if total + left_out != n:
        raise RuntimeError(f"evaluation counted {total + left_out} test images, the test set has {n}")
    per_class = (conf.diag().double() / conf.sum(1).clamp(min=1).double()).tolist()
    return {"test_accuracy": correct / max(total, 1), "test_correct": correct, "test_total": total,
            "per_class_accuracy": per_class, "confusion_matrix": conf.tolist()}
