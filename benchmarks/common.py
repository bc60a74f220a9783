"""What every benchmark shares: the command line (--json, --data-dir), the result stamp, starting train.py,
CPU-time measurement and the timing loop of an input pipeline.

Each script starts with `sys.path.insert(0, <checkout>)` so that `python benchmarks/NAME.py` imports this
checkout's `benchmarks` and `dist_cnn`, not an installed copy. Nothing here imports dist_cnn or torch at
import time: benchmarks/tutorial.py, which must not use dist_cnn, imports this module too.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CIFAR_DIR = ROOT / "data" / "cifar10-jpeg"  # where launch/local.sh unpacks the shared CIFAR-10 copy
RESULTS = ROOT / "benchmarks" / "results"  # git-ignored
SYNTHETIC = "not read: this benchmark generates its own tensors (accepted so every benchmark takes the same flags)"

# ------------------------------------------------------------------------------------------ command line


def parser(
    doc: str, data_help: str, data_default: str | Path | None = None, data_aliases=()
) -> argparse.ArgumentParser:
    """An ArgumentParser with the flags every benchmark takes: --json PATH and --data-dir DIR. data_aliases
    are earlier names of --data-dir, still accepted but not shown."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH", help="write the results here (with the stamp: commit, machine, load)")
    p.add_argument("--data-dir", default=None if data_default is None else str(data_default), help=data_help)
    for alias in data_aliases:
        p.add_argument(alias, dest="data_dir", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


# ------------------------------------------------------------------------------------------ the stamp


def _git(root: Path, *args: str) -> str | None:
    try:
        p = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return p.stdout.strip() if p.returncode == 0 else None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _torch_fields() -> dict:
    """torch's version and the vector ISA its CPU kernels use here (AVX2, AVX512, ...): a virtual
    machine's model name often hides the ISA, and it halves or doubles the figures (bf16 autocast most
    of all). None for both without torch."""
    try:
        import torch
    except ImportError:
        return {"torch": None, "cpu_capability": None}
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


class Stamp:
    """Where and when a result was measured: taken when the benchmark starts, closed (the load average at
    the end) each time a result is written."""

    def __init__(self, root: Path = ROOT):
        sha, status = (
            _git(root, "rev-parse", "--short", "HEAD"),
            _git(root, "status", "--porcelain", "--untracked-files=no"),
        )
        self.fields = {
            "commit": sha,
            "dirty": None if status is None else bool(status),
            **_torch_fields(),
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "load_start": list(os.getloadavg()),
        }

    def close(self) -> dict:
        return {**self.fields, "load_end": list(os.getloadavg())}

    def result(self, results: dict) -> dict:
        """The results with the stamp in front."""
        return {"stamp": self.close(), **results}

    def write(self, path: str | Path | None, results: dict) -> dict:
        """Writes the stamped results to path (nothing without one); returns them."""
        out = self.result(results)
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(json.dumps(out, indent=2) + "\n")
        return out

    def report(self, path: str | Path | None, results: dict) -> dict:
        """write(), then the load average line a benchmark's printout ends with."""
        out = self.write(path, results)
        start, end = out["stamp"]["load_start"][0], out["stamp"]["load_end"][0]
        print(f"  load average (1 min): {start:.2f} at the start, {end:.2f} at the end")
        return out


# ------------------------------------------------------------------------------------------ train.py


def launch(script: str | Path, nproc: int = 1) -> list[str]:
    """The command that runs a Python script in nproc processes: as is for one, under torchrun for more."""
    if nproc == 1:
        return [sys.executable, str(script)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]


def train_command(args, out: str | Path, nproc: int = 1, root: Path = ROOT) -> list[str]:
    """`train.py ARGS` of the checkout at root, writing its run to out, without W&B or progress lines."""
    # args last: a flag given there (--wandb online, say) wins
    return [
        *launch(root / "train.py", nproc),
        "--out",
        str(out),
        "--wandb",
        "disabled",
        "--no-progress",
        *map(str, args),
    ]


def child_env(root: Path = ROOT, **extra: str) -> dict:
    """The environment of a started train.py: this one, the checkout first on PYTHONPATH, W&B off."""
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "WANDB_MODE": "disabled", **extra}


def read_run(out: str | Path) -> tuple[dict, list[dict]]:
    """A finished run's summary.json ({} when it wrote none) and its metrics.jsonl rows."""
    out = Path(out)
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return summary, [json.loads(line) for line in lines if line.strip()]


def steady(values: list) -> list:
    """Logged intervals without the first, which holds start-up (all of them when there is only one)."""
    return values[1:] or values


# ------------------------------------------------------------------------------------------ measuring


def cpu_seconds(pids=()) -> float:
    """CPU time (user + system) of this process's threads plus that of the given live processes (Linux
    /proc; one that has exited counts nothing)."""
    tick, total = os.sysconf("SC_CLK_TCK"), time.process_time()
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


def children_cpu_seconds() -> float:
    """CPU seconds of the waited-for child processes so far: a started run's CPU time is the difference
    around it. Under load this moves far less than wall-clock throughput."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pipeline_rate(batches, loader, warmup: int, count: int, batch: int) -> dict:
    """Wall-clock images/s of consuming `count` batches, and the CPU time the training process and its
    DataLoader workers spent per image meanwhile: on a busy machine the wall clock measures the
    neighbours, the CPU time per image measures the pipeline."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    pids = [w.pid for w in loader._iterator._workers]
    c0, t0 = cpu_seconds(pids), time.perf_counter()
    for _ in range(count):
        next(it)
    wall, cpu = time.perf_counter() - t0, cpu_seconds(pids) - c0
    del it
    gc.collect()  # stop this loader's workers before the next one forks its own
    return {"images_per_sec": count * batch / wall, "cpu_ms_per_image": 1000 * cpu / (count * batch)}
