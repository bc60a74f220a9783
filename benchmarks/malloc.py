"""Page faults and CPU time per training step with glibc's default malloc thresholds, with
dist_cnn.train.allocator.tune_malloc() (mallopt, what training does by default), and with the same values
set as MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ in the environment before the process starts.

Each variant runs in its own process, interleaved over --rounds; medians are printed. Page faults and
CPU-seconds per step hardly depend on what else the machine runs, so this is meaningful on a loaded
machine where images/s are not.

    python benchmarks/malloc.py [--model seed] [--batch 128] [--steps 30] [--rounds 3] [--json PATH]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's benchmarks and dist_cnn

from benchmarks.common import SYNTHETIC, Stamp, parser  # noqa: E402

ENV_VALUES = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}
MODES = ("off", "mallopt", "env")


def child(mode: str, model: str, batch: int, steps: int) -> None:
    import torch
    import torch.nn.functional as F

    from dist_cnn.models.registry import build_model
    from dist_cnn.train.allocator import tune_malloc

    torch.set_num_threads(1)
    if mode == "mallopt" and not tune_malloc():
        raise SystemExit("mallopt failed (not glibc?)")
    torch.manual_seed(0)
    m = build_model(model, 3, 10, 32).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, foreach=True)
    x = torch.randn(batch, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))

    def step():
        F.cross_entropy(m(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    r0, c0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
    for _ in range(steps):
        step()
    r1, c1 = resource.getrusage(resource.RUSAGE_SELF), time.process_time()
    print(
        json.dumps(
            {"faults_per_step": (r1.ru_minflt - r0.ru_minflt) / steps, "cpu_ms_per_step": (c1 - c0) / steps * 1e3}
        )
    )


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, SYNTHETIC)
    p.add_argument("--model", default="seed")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        child(a.child, a.model, a.batch, a.steps)
        return 0
    stamp = Stamp()
    res = {m: [] for m in MODES}
    for _ in range(a.rounds):
        for mode in MODES:
            env = {k: v for k, v in os.environ.items() if k not in ENV_VALUES}
            env.update(OMP_NUM_THREADS="1", **(ENV_VALUES if mode == "env" else {}))
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    mode,
                    "--model",
                    a.model,
                    "--batch",
                    str(a.batch),
                    "--steps",
                    str(a.steps),
                ],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            res[mode].append(json.loads(out.strip().splitlines()[-1]))
    print(f"{a.model}, batch {a.batch}, fp32, 1 thread, {a.steps} steps x {a.rounds} rounds (medians)")
    base = statistics.median(r["cpu_ms_per_step"] for r in res["off"])
    medians = {}
    for mode in MODES:
        faults = statistics.median(r["faults_per_step"] for r in res[mode])
        cpu = statistics.median(r["cpu_ms_per_step"] for r in res[mode])
        medians[mode] = {"faults_per_step": faults, "cpu_ms_per_step": cpu, "images_per_cpu_second_vs_off": base / cpu}
        print(
            f"  {mode:8s} {faults:8.1f} page faults/step  {cpu:7.2f} CPU ms/step  "
            f"{base / cpu:5.2f}x images per CPU-second"
        )
    stamp.write(a.json, {"model": a.model, "batch": a.batch, "steps": a.steps, "runs": res, "medians": medians})
    return 0


if __name__ == "__main__":
    sys.exit(main())
