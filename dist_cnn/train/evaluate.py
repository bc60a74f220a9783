"""Exact test metrics at any world size: each rank scores its own contiguous shard, counts are summed.

No padding and no duplicates (DistributedSampler pads), so the confusion matrix counts every test
image exactly once; the total is checked against the test set's size.

A stop signal never waits for a long evaluation (SLURM kills KillWait seconds after SIGTERM, often
30): before every batch the ranks agree, in one tiny all_reduce, on whether to stop and whether anyone
still has images to score. In-memory batches are sized to take about STOP_CHECK_SECONDS on rank 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

from dist_cnn.data.loader import Normalize, eval_shard
from dist_cnn.distributed.process_group import DistEnv, all_reduce_sum
from dist_cnn.models.registry import tta_logits
from dist_cnn.train.precision import autocast

STOP_CHECK_SECONDS = 1.0  # how often, at most, the ranks vote on a stop during an evaluation


def sync_buffers(model: torch.nn.Module, env: DistEnv) -> None:
    """Rank 0's BatchNorm statistics everywhere: each rank's last forward updated its own."""
    if env.initialized:
        for b in model.buffers():
            dist.broadcast(b, src=0)


def evaluate(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_classes: int,
    normalize: Normalize,
    env: DistEnv,
    precision: str,
    batch_size: int = 1000,
    tta: int = 0,
    should_stop: Callable[[], bool] | None = None,
) -> dict | None:
    """In-memory test tensors: this rank's contiguous shard; None when a stop cut it short."""
    part = eval_shard(len(x), env.rank, env.world_size)
    sizer = _BatchSizer(batch_size, env)

    def batches():
        pos = part.start
        while pos < part.stop:
            end = min(pos + sizer.size, part.stop)
            yield (
                normalize(x[pos:end].to(env.device, non_blocking=True)),
                y[pos:end].to(env.device, non_blocking=True),
            )
            pos = end

    return evaluate_batches(
        model,
        batches(),
        len(x),
        num_classes=num_classes,
        env=env,
        precision=precision,
        tta=tta,
        should_stop=should_stop,
        sizer=sizer,
    )


def evaluate_source(
    model: torch.nn.Module,
    source,
    *,
    normalize: Normalize,
    env: DistEnv,
    precision: str,
    batch_size: int,
    workers: int = 0,
    tta: int = 0,
    should_stop: Callable[[], bool] | None = None,
    predictions: list | None = None,
) -> dict | None:
    """A source.DataSource's test set: this rank's contiguous shard; None when a stop cut it short.
    batch_size is the cap of an adaptively sized source (in memory), else the batch."""
    sizer = _BatchSizer(batch_size, env) if source.adaptive_eval else None
    batches = source.eval_batches(
        rank=env.rank,
        world=env.world_size,
        normalize=normalize,
        device=env.device,
        batch_size=(lambda: sizer.size) if sizer else batch_size,
        workers=workers,
    )
    return evaluate_batches(
        model,
        batches,
        source.test_size,
        num_classes=source.num_classes,
        env=env,
        precision=precision,
        tta=tta,
        should_stop=should_stop,
        sizer=sizer,
        predictions=predictions,
    )


class _BatchSizer:
    """Rank 0 times each batch and sizes the next to take about STOP_CHECK_SECONDS (at most `limit`);
    agree() gives every rank rank 0's size."""

    def __init__(self, limit: int, env: DistEnv):
        self.limit, self.env, self.size, self.started = limit, env, min(limit, 16), None

    def agree(self) -> None:
        mine = torch.tensor([float(self.size if self.env.is_rank0 else 0)], device=self.env.device)
        self.size, self.started = max(1, int(all_reduce_sum(mine).item())), time.perf_counter()

    def done(self) -> None:
        if self.env.is_rank0:  # the vote's .tolist() waited for the device, so this times the batch itself
            seconds = time.perf_counter() - self.started
            self.size = max(1, min(self.limit, int(self.size * STOP_CHECK_SECONDS / max(seconds, 1e-3))))


@torch.no_grad()
def evaluate_batches(
    model: torch.nn.Module,
    batches: Iterable,
    n: int,
    *,
    num_classes: int,
    env: DistEnv,
    precision: str,
    tta: int = 0,
    should_stop: Callable[[], bool] | None = None,
    sizer: _BatchSizer | None = None,
    predictions: list | None = None,
) -> dict | None:
    """Score this rank's (normalized x, y) batches of its shard; the counts of all ranks are summed and
    must cover the n test images. Label -1 marks an image left out (unreadable, --skip-bad-images).
    None when any rank's `should_stop` became true. `predictions`: a list that gets this rank's
    predicted class of each sample, in order (-1 for one left out)."""
    was_training = model.training
    model.eval()
    sync_buffers(model, env)
    conf = torch.zeros(num_classes * num_classes + 1, dtype=torch.int64, device=env.device)  # + left out
    it = iter(batches)
    while True:
        if sizer is not None:
            sizer.agree()
        batch = next(it, None)
        vote = torch.tensor(
            [float(should_stop is not None and should_stop()), float(batch is not None)], device=env.device
        )
        stop, busy = (int(v) for v in all_reduce_sum(vote).tolist())
        if stop:
            model.train(was_training)
            return None
        if not busy:
            break
        if batch is not None:
            xb, yb = batch
            with autocast(precision, env.device):
                pred = tta_logits(model, xb, tta).argmax(1)
            cell = torch.where(yb >= 0, yb * num_classes + pred, num_classes * num_classes)
            if predictions is not None:
                predictions += torch.where(yb >= 0, pred, -1).tolist()
            conf += torch.bincount(cell, minlength=num_classes * num_classes + 1)
        if sizer is not None:
            sizer.done()
    conf = all_reduce_sum(conf).cpu()
    left_out, conf = int(conf[-1]), conf[:-1].view(num_classes, num_classes)
    model.train(was_training)
    total, correct = int(conf.sum()), int(conf.diag().sum())
    if total + left_out != n:
        raise RuntimeError(f"evaluation counted {total + left_out} test images, the test set has {n}")
    # a class without test images has no accuracy (None: null in JSON, n/a on the console), not 0%
    per_class = [c / n if n else None for c, n in zip(conf.diag().tolist(), conf.sum(1).tolist())]
    return {
        "test_accuracy": correct / max(total, 1),
        "test_correct": correct,
        "test_total": total,
        "per_class_accuracy": per_class,
        "confusion_matrix": conf.tolist(),
    }
