"""Interleaved A/B of checkouts (and the plain DDP loop) through the real train.py at one world size.

Each round runs every variant once, in turn, starting one later each round, so a change in the
machine's load hits them alike. The report: each variant's median images/s over the rounds, its
median ratio to the first variant (to the plain loop with --plain), the load average, and the CPU
seconds each run's processes used (start-up included: compare it between checkouts of dist_cnn,
whose start-up is the same, not with the plain loop).

    python benchmarks/ab.py --world 2 --rounds 3 --plain before=/path/to/checkout after=. [--extra train.py flags]
"""

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's benchmarks and dist_cnn

from benchmarks.common import SYNTHETIC, Stamp, children_cpu_seconds, parser  # noqa: E402
from benchmarks.scaling import plain_ips, train_ips  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, SYNTHETIC)
    p.add_argument("variants", nargs="+", help="NAME=CHECKOUT, the first is the reference")
    p.add_argument("--model", default="seed")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--per-rank-batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--plain", action="store_true", help="also run the plain DDP loop; ratios are to it")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags for train.py")
    a = p.parse_args(argv)
    stamp = Stamp()
    roots = dict(v.split("=", 1) for v in a.variants)
    runs = {name: [] for name in (["plain"] if a.plain else []) + list(roots)}
    cpu = {name: [] for name in runs}
    load = [os.getloadavg()[0]]
    names = list(runs)
    for r in range(a.rounds):  # each round starts with the next variant: a load trend favours none
        for name in names[r % len(names) :] + names[: r % len(names)]:
            before = children_cpu_seconds()
            if name == "plain":
                ips = plain_ips(a.world, a.per_rank_batch, a.steps, a.model)
            else:
                ips = train_ips(a.world, a.per_rank_batch, a.steps, a.model, Path(roots[name]).resolve(), a.extra)
            runs[name].append(ips)
            cpu[name].append(children_cpu_seconds() - before)
            load.append(os.getloadavg()[0])
            print(f"  {name}: {ips:.1f} img/s, {cpu[name][-1]:.1f} CPU s (load {load[-1]:.2f})", flush=True)
    ref = next(iter(runs))
    res = {
        "model": a.model,
        "world": a.world,
        "runs": runs,
        "median": {n: statistics.median(v) for n, v in runs.items()},
        f"vs_{ref}": {n: statistics.median(x / y for x, y in zip(v, runs[ref])) for n, v in runs.items()},
        "cpu_seconds": cpu,
        "median_cpu_seconds": {n: statistics.median(v) for n, v in cpu.items()},
        "load_1min": load,
    }
    print(f"{a.model}, world size {a.world}, {a.per_rank_batch} images per rank, {a.rounds} interleaved rounds")
    for n in runs:
        print(
            f"  {n:>14}: {res['median'][n]:8.1f} img/s   / {ref}: {res[f'vs_{ref}'][n]:.3f}   "
            f"{res['median_cpu_seconds'][n]:7.1f} CPU s a run"
        )
    print(f"  load average (1 min) during the rounds: {min(load):.2f} to {max(load):.2f}")
    stamp.write(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
