"""The plain DDP loop a user would write, as the ceiling dist_cnn's DDP mode is measured against.

Preloaded tensors (the same synthetic set train.py generates, normalized once), channels_last, the
same glibc malloc thresholds as train.py (tune_malloc), DDP with its defaults over gloo, SGD with
Nesterov momentum, and nothing else: no augmentation, no agreement between ranks, no checkpoints.
Run under torchrun for 2 ranks or as is for 1; rank 0 writes the throughput of each interval.

    python -m torch.distributed.run --standalone --nproc_per_node=2 benchmarks/plain_ddp.py \
        --model seed --per-rank-batch 64 --steps 200 --json out.json
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's benchmarks

from benchmarks.common import SYNTHETIC, Stamp, parser  # noqa: E402
from dist_cnn.data.datasets import load_synthetic  # noqa: E402
from dist_cnn.models.registry import build_model  # noqa: E402
from dist_cnn.train.allocator import tune_malloc  # noqa: E402

INTERVALS = 5  # as scaling.py: the first interval holds start-up and is dropped by the caller


def plain_loop(model_name: str, per_rank_batch: int, steps: int, world: int, rank: int):
    """The loop's set-up (data, model, optimizer) in a process whose group is up; returns run(n), which
    trains the next n steps of this rank's share and reads the loss once at the end."""
    cfg = argparse.Namespace(synthetic_train_size=per_rank_batch * world * steps, synthetic_test_size=10)
    data = load_synthetic(cfg)
    x = data.train_x.float().div_(255).sub_(0.5).div_(0.25).contiguous(memory_format=torch.channels_last)
    y = data.train_y
    model = build_model(model_name, 3, 10, 32).to(memory_format=torch.channels_last)
    if world > 1:
        model = DDP(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.08, momentum=0.9, nesterov=True, weight_decay=5e-4)
    order = torch.randperm(len(x))[rank::world]  # this rank's share of the epoch
    position = [0]

    def run(n: int) -> None:
        for _ in range(n):
            step = position[0] % (len(order) // per_rank_batch)
            idx = order[step * per_rank_batch : (step + 1) * per_rank_batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            position[0] += 1
        loss.item()

    return run


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, SYNTHETIC)
    p.add_argument("--model", default="seed")
    p.add_argument("--per-rank-batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=200)
    a = p.parse_args(argv)
    stamp = Stamp()
    tune_malloc()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    run = plain_loop(a.model, a.per_rank_batch, a.steps, world, rank)

    log_every, rates, t0 = max(1, a.steps // INTERVALS), [], time.perf_counter()
    for _ in range(a.steps // log_every):
        run(log_every)
        now = time.perf_counter()
        rates.append(log_every * a.per_rank_batch * world / (now - t0))
        t0 = now
    if rank == 0:
        res = stamp.write(
            a.json, {"model": a.model, "world": world, "per_rank_batch": a.per_rank_batch, "images_per_sec": rates}
        )
        if not a.json:
            print(json.dumps(res, indent=2))
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
