"""dist_cnn's Trainer against the plain DDP loop, in the same processes, in paired blocks of steps.

End-to-end runs (scaling.py) compare two programs started seconds apart, and on a shared machine the
speed drifts by 10-30% over such spans. Here each rank builds both -- the real Trainer (train.py's
synthetic job: fp32, one thread, the flags below) and benchmarks/plain_ddp.py's loop -- and trains
them in turn, a block of steps each, for many rounds, every other round in the other order: the
drift falls on both alike. A block is timed from a barrier to a barrier, so it is the slowest rank's
time. Reported: ms per step of each (medians) and the median over rounds of the throughput ratio
dist_cnn / plain of the round's two blocks, with its quartiles.

    python benchmarks/trainer_vs_plain.py [--worlds 1,2] [--model seed] [--per-rank-batch 64]
                                          [--block 20] [--rounds 30] [--json PATH] [-- extra train.py flags]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's benchmarks and dist_cnn

from benchmarks.common import SYNTHETIC, Stamp, child_env, launch, parser  # noqa: E402
from benchmarks.plain_ddp import plain_loop  # noqa: E402
from dist_cnn import config  # noqa: E402
from dist_cnn.distributed import process_group  # noqa: E402
from dist_cnn.errors import UserError  # noqa: E402
from dist_cnn.models.registry import check_spec  # noqa: E402
from dist_cnn.train.allocator import tune_malloc  # noqa: E402
from dist_cnn.train.trainer import Trainer  # noqa: E402


def steps_needed(a) -> int:
    """Steps each program trains: every round's block, the warm-up round's, and a margin."""
    return a.block * (a.rounds + 1) + 10


def trainer_config(a, world: int, out: Path) -> config.Config:
    steps = steps_needed(a)
    args = [
        "--out", str(out), "--wandb", "disabled", "--no-progress", "--no-plots",
        "--model", a.model, "--dataset", "synthetic",
        "--synthetic-train-size", str(a.per_rank_batch * world * steps), "--synthetic-test-size", "200",
        "--batch-size", str(a.per_rank_batch * world), "--epochs", "1", "--precision", "fp32",
        "--eval-every", "0", "--log-every", str(a.block), *a.extra,
    ]  # fmt: skip
    return config.from_args(config.train_parser().parse_args(args))


def worker(a) -> None:
    """One rank (under torchrun for 2): both programs, paired blocks; rank 0 writes the timings."""
    tune_malloc()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = trainer_config(a, world, Path(a.out))
    with process_group.process_group(cfg.dist.backend, cfg.dist.timeout, cfg.dist.setup_timeout) as env:
        trainer = Trainer(cfg, env)
        torch.manual_seed(0)
        plain = plain_loop(a.model, a.per_rank_batch, steps_needed(a), world, env.rank)
        programs = {"dist_cnn": trainer.run_steps, "plain": plain}
        ms = {k: [] for k in programs}
        for r in range(a.rounds + 1):  # round 0 warms both up (buckets, allocator) and is not counted
            for name in list(programs) if r % 2 else list(programs)[::-1]:
                if world > 1:
                    dist.barrier()
                t0 = time.perf_counter()
                programs[name](a.block)
                if world > 1:
                    dist.barrier()
                if r:
                    ms[name].append((time.perf_counter() - t0) / a.block * 1e3)
        trainer.heartbeat.stop()
        trainer.stop.uninstall()
        if env.rank == 0:
            Path(a.result).write_text(json.dumps(ms))


def compare(a, world: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="trainer-vs-plain-") as tmp:
        result = Path(tmp) / "ms.json"
        argv = ["--worker", "--out", str(Path(tmp) / "run"), "--result", str(result)]
        argv += ["--model", a.model, "--per-rank-batch", str(a.per_rank_batch)]
        argv += ["--block", str(a.block), "--rounds", str(a.rounds), "--", *a.extra]
        subprocess.run([*launch(__file__, world), *argv], check=True, env=child_env(OMP_NUM_THREADS="1"))
        ms = json.loads(result.read_text())
    ratios = [p / d for d, p in zip(ms["dist_cnn"], ms["plain"])]  # throughput: the inverse of time
    return {
        "ms_per_step": {k: statistics.median(v) for k, v in ms.items()},
        "ratio": statistics.median(ratios),
        "quartiles": statistics.quantiles(ratios, n=4),
        "rounds": ratios,
    }


def world_sizes(text: str) -> list[int]:
    try:
        worlds = [int(w) for w in text.split(",")]
    except ValueError:
        worlds = []
    if not worlds or min(worlds) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: world sizes of 1 or more, comma-separated (1,2)")
    return worlds


def at_least(low: int):
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r}: a whole number of at least {low}")
        return value

    return check


def model_spec(text: str) -> str:
    try:
        check_spec(text)
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, SYNTHETIC)
    p.add_argument("--worlds", type=world_sizes, default="1,2", help="world sizes, comma-separated (2: under torchrun)")
    p.add_argument("--model", type=model_spec, default="seed", help="a --model spec of train.py")
    p.add_argument("--per-rank-batch", type=at_least(1), default=64)
    p.add_argument("--block", type=at_least(1), default=20, help="steps of one program in a row")
    p.add_argument("--rounds", type=at_least(2), default=30, help="paired rounds (at least 2: quartiles)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*", help="flags passed on to the Trainer's train.py options (after --)")
    a = p.parse_args(argv)
    if a.worker:
        worker(a)
        return 0
    stamp = Stamp()
    res = {"model": a.model, "per_rank_batch": a.per_rank_batch, "block": a.block, "extra": a.extra}
    print(f"{a.model}, {a.per_rank_batch} images per rank, fp32, 1 thread per rank, {a.rounds} rounds of {a.block}")
    for world in a.worlds:
        r = res[f"world_{world}"] = compare(a, world)
        q = ", ".join(f"{x:.3f}" for x in r["quartiles"])
        print(
            f"  world size {world}: dist_cnn {r['ms_per_step']['dist_cnn']:.2f} ms/step, plain "
            f"{r['ms_per_step']['plain']:.2f}; dist_cnn / plain throughput {r['ratio']:.3f} (quartiles {q})"
        )
    stamp.report(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
