"""Test helpers: run the real entry points in subprocesses, on small synthetic data."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.support import forkserver

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
# Small enough to train in seconds on 2 cores, big enough that the seed CNN gets far above chance;
# SMALL_ANY_PRECISION leaves --precision to the test.
SMALL_ANY_PRECISION = [
    "--dataset",
    "synthetic",
    "--synthetic-train-size",
    "2048",
    "--synthetic-test-size",
    "500",
    "--batch-size",
    "64",
    "--epochs",
    "1",
    "--wandb",
    "disabled",
    "--no-progress",
    "--no-plots",  # the tests of the plots ask for them (--plots)
]
SMALL = [*SMALL_ANY_PRECISION, "--precision", "fp32"]
# metrics.jsonl fields that differ between two runs of the same training (timing, paths)
NOISE = {
    "time",
    "images_per_sec",
    "images_per_sec_per_rank",
    "data_wait_frac",
    "epoch_seconds",
    "eta_seconds",
    "memory_mb",
    "train_seconds",
    "path",
    "from",
    "rank_data_wait_ms",
    "rank_forward_backward_ms",
    "rank_comm_wait_ms",
    "rank_optimizer_ms",
    "rank_step_ms",
    "straggler_rank",
}


def clean_env(**extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "TORCHELASTIC_", "WANDB_"))
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
    }
    # Subprocesses import this checkout's dist_cnn, whatever their cwd or the venv's installed copy.
    env.update({"PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true", "PYTHONPATH": str(ROOT), **extra})
    return env


def run_py(args, *, cwd=ROOT, env=None, timeout=300, check=None) -> subprocess.CompletedProcess:
    """`python ARGS` to its end, its output captured: forked from this worker's fork server where that
    is the same as a new interpreter (tests/support/forkserver.py), else a new interpreter."""
    args, env = list(map(str, args)), env or clean_env()
    p = forkserver.run(args, cwd=cwd, env=env, timeout=timeout, server_env=clean_env())
    if p is None:
        p = subprocess.run([PY, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check is not None and p.returncode != check:
        raise AssertionError(
            f"exit {p.returncode} (wanted {check}) for {args}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-5000:]}"
        )
    return p


def train(args, **kw) -> subprocess.CompletedProcess:
    return run_py([ROOT / "train.py", *args], **kw)


def torchrun(nproc: int, args, **kw) -> subprocess.CompletedProcess:
    return run_py(
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", ROOT / "train.py", *args], **kw
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def read_events(run_dir: Path, event: str | None = None) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    return [r for r in rows if event is None or r["event"] == event]


def wait_until(condition, timeout: float = 180.0, what: str = "the condition", interval: float = 0.2):
    """Poll `condition()` until it returns a true value, and return that value; TimeoutError naming
    `what` after `timeout` seconds. A condition that sees the wait is hopeless (the process it waits on
    has exited) raises at once itself."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() >= deadline:
            raise TimeoutError(f"no {what} after {timeout:.0f} s")
        time.sleep(interval)
    return value


def assert_one_line_error(p: subprocess.CompletedProcess, *needles: str, code: int = 2) -> None:
    """The bad-input contract: exit `code`, one `error:` line on stderr naming each needle, no traceback."""
    assert p.returncode == code, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    for n in needles:
        assert n in p.stderr, (n, p.stderr)
