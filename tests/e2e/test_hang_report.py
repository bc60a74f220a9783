"""The hang report under torchrun, 2 ranks, --timeout 10: a rank stopped with SIGSTOP, and a rank stuck
in its data loader, are each named by rank 0's one line with their phase and step; the live ranks
write their Python stacks to RUN_DIR/hang/rank-N.txt."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from tests.support.common import PY, ROOT, clean_env, wait_until

from .test_reliability import events, wait_for
from .test_signals_group import SYNTHETIC

pytestmark = pytest.mark.slow


def start_job(script: str, out, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [
            PY,
            "-m",
            "dist_cnn.distributed.torchrun",
            "--standalone",
            "--nproc_per_node=2",
            ROOT / "tests" / "support" / script,
            *SYNTHETIC,
            "--loader",
            "device",
            "--timeout",
            "10",
            "--out",
            out,
        ],
        cwd=ROOT,
        env=clean_env(OMP_NUM_THREADS="1", **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def rank_pids(agent: int) -> dict[int, int]:
    """The agent's worker processes by RANK."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != agent:
                continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
        except (OSError, ValueError, IndexError):
            continue
        if b"RANK" in env:
            out[int(env[b"RANK"])] = int(pid)
    return out


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def finish(proc, pids) -> str:
    """Once rank 0 has reported: end what is left of the job (torchrun would wait 30 s for it)."""
    wait_until(lambda: gone(pids[0]), timeout=120, what="rank 0's exit")
    for pid in pids.values():
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    return stderr


def report_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if "last seen" in ln]
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_stopped_rank_is_named_with_its_phase_and_step(tmp_path):
    out = tmp_path / "run"
    proc = start_job("slow_train.py", out, STEP_SLEEP="0.3")
    wait_for(lambda: any(e["step"] >= 2 for e in events(out, "train")), proc=proc)
    pids = rank_pids(proc.pid)
    os.kill(pids[1], signal.SIGSTOP)
    stopped_at = time.time()
    stderr = finish(proc, pids)
    line = report_line(stderr)
    assert "[rank 0] error: lost contact" in line and "rank 1 last seen" in line and " at step " in line, line
    seen = int(line.split("rank 1 last seen ")[1].split(" s ago")[0])
    assert seen >= 6 and seen <= time.time() - stopped_at + 3  # silent since the stop (heartbeat 2 s)
    assert "the others wait in" in line
    stack = (out / "hang" / "rank-0.txt").read_text()
    assert "The failed collective" in stack and "Current thread" in stack


def test_a_rank_stuck_in_its_data_loader_is_named(tmp_path):
    out = tmp_path / "run"
    proc = start_job("stuck_data.py", out, STUCK_RANK="1", STUCK_STEP="3")
    wait_for(lambda: rank_pids(proc.pid).keys() == {0, 1}, proc=proc)
    pids = rank_pids(proc.pid)
    stderr = finish(proc, pids)
    line = report_line(stderr)
    assert "rank 1 last seen" in line and "in data wait at step 3" in line, line
    assert "the others wait in" in line and "data wait;" not in line.split("the others wait in")[1]
    stuck = (out / "hang" / "rank-1.txt").read_text()
    assert stuck.startswith("rank 1: data wait at step 3") and "stuck_data.py" in stuck
    assert (out / "hang" / "rank-0.txt").exists()
