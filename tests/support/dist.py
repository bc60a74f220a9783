"""A real gloo process group of N processes inside a unit test (torch.multiprocessing).

    results = run_group(3, fn, arg, tmp_dir=tmp_path)   # fn(env: DistEnv, arg) on every rank
    (timeout_s=...: the group's collective timeout, 60 s unless given)

`fn` must be importable (a module-level function); each rank's return value comes back through a
file (torch.save, weights_only types), in rank order. A rank that raises fails the call with its
traceback (torch.multiprocessing.ProcessRaisedException).

The ranks are forked where the platform can: they inherit the imported torch and start in well
under a second, where spawned ones import torch again (seconds each on a busy 2-core machine).
Forking is safe here because the parent has joined no process group and each rank runs one
intra-op thread (as DataLoader workers do); start_method="spawn" is the portable choice.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_cnn.distributed.process_group import DistEnv


def _rank_main(rank: int, world: int, store: str, out_dir: str, fn, args, timeout_s: float = 60) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    try:
        env = DistEnv(
            rank=rank,
            world_size=world,
            local_rank=rank,
            launcher="torchrun",
            backend="gloo",
            device=torch.device("cpu"),
        )
        result = fn(env, *args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_group(world: int, fn, *args, tmp_dir: Path, start_method: str | None = None, timeout_s: float = 60) -> list:
    out = Path(tmp_dir) / f"group{world}"
    out.mkdir(parents=True, exist_ok=True)
    if start_method is None:
        start_method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(
        _rank_main,
        args=(world, str(out / "store"), str(out), fn, args, timeout_s),
        nprocs=world,
        join=True,
        start_method=start_method,
    )
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]
