"""CPU data-parallel scaling of a model (seed or resnet18), world size 2 against 1.

Same per-rank batch, one thread per rank, fp32, through the real train.py (torchrun for 2 ranks).
Efficiency = images/s at 2 ranks / (2 x images/s at 1 rank), images/s being the median of the logged
intervals after the first (which holds start-up and DDP's bucket rebuild). Printed beside it, measured
in the same run: the ceiling two processes of pure matrix products reach on this machine (efficiency /
ceiling is what the targets are about); the same ceiling for this very training job, two independent
world-size-1 runs at once (what sharing the machine's cores, caches and memory costs without any
communication); and the time of the gradient all_reduce (gloo, loopback) against the step time.

Beside dist_cnn, each round also runs the plain DDP loop a user would write (benchmarks/plain_ddp.py:
preloaded tensors, channels_last, the same malloc settings, DDP defaults, gloo) at the same world sizes
and prints dist_cnn / plain at each: the framework's own cost in DDP mode (--no-plain skips it).

    python benchmarks/scaling.py [--model seed|resnet18] [--per-rank-batch 64] [--steps 200] [--no-job-ceiling]
                                 [--repeats 2] [--no-plain] [--root CHECKOUT] [--json out.json]
                                 [-- extra train.py flags]

--root runs another checkout's train.py (a before/after comparison); flags after -- go to train.py
(e.g. -- --no-malloc-tune, -- --ddp-comm-hook bf16).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's benchmarks and dist_cnn

from benchmarks.common import (  # noqa: E402  # noqa: E402
    ROOT,
    SYNTHETIC,
    Stamp,
    child_env,
    free_port,
    launch,
    parser,
    read_run,
    steady,
    train_command,
)

THREADS = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
INTERVALS = 5  # logged throughput intervals per run; the first is dropped


def train_ips(world: int, batch: int, steps: int, model: str = "seed", root: Path = ROOT, extra=()) -> float:
    out = Path(tempfile.mkdtemp(prefix="scaling-")) / "run"
    args = [
        "--model",
        model,
        "--dataset",
        "synthetic",
        "--synthetic-train-size",
        batch * world * steps,
        "--synthetic-test-size",
        200,
        "--batch-size",
        batch * world,
        "--epochs",
        1,
        "--precision",
        "fp32",
        "--eval-every",
        0,
        "--log-every",
        max(1, steps // INTERVALS),
        *extra,
    ]
    subprocess.run(
        train_command(args, out, world, root),
        check=True,
        env=child_env(root, **THREADS),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _, rows = read_run(out)
    return statistics.median(steady([r["images_per_sec"] for r in rows if r.get("event") == "train"]))


def plain_ips(world: int, batch: int, steps: int, model: str = "seed", root: Path = ROOT) -> float:
    """The same job as train_ips through the plain DDP loop (benchmarks/plain_ddp.py), median likewise."""
    out = Path(tempfile.mkdtemp(prefix="plain-ddp-")) / "plain.json"
    args = ["--model", model, "--per-rank-batch", str(batch), "--steps", str(steps), "--json", str(out)]
    subprocess.run(
        [*launch(ROOT / "benchmarks" / "plain_ddp.py", world), *args],
        check=True,
        env=child_env(root, **THREADS),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return statistics.median(steady(json.loads(out.read_text())["images_per_sec"]))


def independent_ceiling(alone: float, batch: int, steps: int, model: str, root: Path, extra=()) -> float:
    """Two world-size-1 runs of the same job at once, against one alone (`alone` img/s, measured in the
    same round): the 2-process ceiling of this workload (no communication; what the processes cost each
    other through the shared machine)."""
    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(lambda _: train_ips(1, batch, steps, model, root, extra), range(2)))
    return sum(both) / (2 * alone)


def _matmul_worker(rank, seconds, q):
    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        a @ a
        n += 1
    q.put(n / (time.perf_counter() - t))


def matmul_efficiency(seconds: float = 3.0) -> float:
    rates = {}
    for world in (1, 2):
        q = mp.get_context("spawn").SimpleQueue()
        ps = [mp.get_context("spawn").Process(target=_matmul_worker, args=(r, seconds, q)) for r in range(world)]
        [p.start() for p in ps]
        [p.join() for p in ps]
        rates[world] = sum(q.get() for _ in range(world))
    return rates[2] / (2 * rates[1])


def _allreduce_worker(rank, port, numel, q, iters=60):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    t = torch.randn(numel)
    times = []
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(t)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        q.put(statistics.median(times[iters // 6 :]))
    dist.destroy_process_group()


def allreduce_seconds(numel: int) -> float:
    port = free_port()
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    iters = 60 if numel < 4_000_000 else 20
    ps = [ctx.Process(target=_allreduce_worker, args=(r, port, numel, q, iters)) for r in range(2)]
    [p.start() for p in ps]
    [p.join() for p in ps]
    return q.get()


TARGETS = {"seed": 0.85, "resnet18": 0.90}  # of the ceiling measured in the same run


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, SYNTHETIC)
    p.add_argument("--model", default="seed", choices=sorted(TARGETS))
    p.add_argument("--per-rank-batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats; the median is reported")
    p.add_argument("--root", type=Path, default=ROOT, help="the checkout whose train.py runs (default: this one)")
    p.add_argument(
        "--job-ceiling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run two independent world-size-1 runs at once: this job's own 2-process ceiling",
    )
    p.add_argument(
        "--plain",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run the plain DDP loop (benchmarks/plain_ddp.py) at each world size: dist_cnn / plain",
    )
    p.add_argument("extra", nargs="*", help="flags passed on to train.py (after --)")
    a = p.parse_args(argv)
    stamp = Stamp()
    ips, plain, ceilings, job_ceilings = {1: [], 2: []}, {1: [], 2: []}, [], []
    for _ in range(a.repeats):  # interleaved, so load changes hit both sides alike
        for world in (1, 2):
            ips[world].append(train_ips(world, a.per_rank_batch, a.steps, a.model, a.root, a.extra))
            if a.plain:
                plain[world].append(plain_ips(world, a.per_rank_batch, a.steps, a.model, a.root))
        ceilings.append(matmul_efficiency())
        if a.job_ceiling:
            job_ceilings.append(independent_ceiling(ips[1][-1], a.per_rank_batch, a.steps, a.model, a.root, a.extra))
    ws1, ws2, ceiling = statistics.median(ips[1]), statistics.median(ips[2]), statistics.median(ceilings)
    job_ceiling = statistics.median(job_ceilings) if job_ceilings else None
    eff = ws2 / (2 * ws1)
    from dist_cnn.models.registry import build_model

    numel = sum(p.numel() for p in build_model(a.model, 3, 10, 32).parameters())
    ar = allreduce_seconds(numel)
    step = a.per_rank_batch / (ws2 / 2)
    target = TARGETS[a.model]
    res = {
        "model": a.model,
        "per_rank_batch": a.per_rank_batch,
        "ws1_images_per_sec": ws1,
        "ws2_images_per_sec": ws2,
        "efficiency": eff,
        "matmul_efficiency": ceiling,
        "efficiency_vs_ceiling": eff / ceiling,
        "job_ceiling": job_ceiling,
        "job_ceilings": job_ceilings,
        "allreduce_seconds": ar,
        "ws2_step_seconds": step,
        "raw": ips,
        "plain_raw": plain,
        "plain_images_per_sec": {w: statistics.median(v) for w, v in plain.items() if v},
        # each round's ratio (the two ran back to back), then their median
        "vs_plain": {w: statistics.median(d / q for d, q in zip(ips[w], v)) for w, v in plain.items() if v},
        "ceilings": ceilings,
        "root": str(a.root),
        "extra": a.extra,
    }
    print(f"{a.model}, {a.per_rank_batch} images per rank, 1 thread per rank, fp32, {a.root} {' '.join(a.extra)}")
    print(f"  world size 1: {ws1:8.1f} img/s    world size 2: {ws2:8.1f} img/s")
    print(f"  ceiling, two processes of pure matrix products: {ceiling:.3f}")
    if job_ceiling is not None:
        print(f"  ceiling, two independent world-size-1 runs of this job at once: {job_ceiling:.3f}")
    print(
        f"  scaling efficiency: {eff:.3f}, {eff / ceiling:.3f} of the ceiling "
        f"(target >= {target}: {'PASS' if eff / ceiling >= target else 'FAIL'})"
    )
    print(
        f"  gradient all_reduce ({numel:,} floats, gloo): {ar * 1e3:.2f} ms of a {step * 1e3:.1f} ms step "
        f"({ar / step:.1%})"
    )
    for world, ratio in res["vs_plain"].items():
        rounds = ", ".join(f"{d / q:.3f}" for d, q in zip(ips[world], plain[world]))
        print(
            f"  plain DDP loop, world size {world}: {res['plain_images_per_sec'][world]:8.1f} img/s; "
            f"dist_cnn / plain = {ratio:.3f} (rounds: {rounds})"
        )
    stamp.report(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
