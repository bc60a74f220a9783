"""Ray Train (dist_cnn.ray.train) with a real local Ray of 2 CPUs and 2 CPU workers: a worker
SIGKILLed mid-run is restarted by Ray, the run resumes from its newest reported checkpoint (Ray's copy) in the same
run directory and W&B run, and completes with world size 2 and the weights torchrun's 2 processes
get. Ray is shut down by the driver and no process of it is left behind.

One Ray session for everything: starting Ray and its workers takes minutes on a busy 2-core machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from tests.support.common import PY, ROOT, SMALL, clean_env, read_events, read_summary, torchrun, wait_until
from tests.support.wandb_records import offline_run_dirs

pytest.importorskip("ray.train")
pytestmark = pytest.mark.slow

DRIVER = ROOT / "tests" / "support" / "ray_driver.py"
# 2 epochs of 16 steps, a checkpoint every 4; each step slowed to >= 0.3 s so that the run is still
# training when a worker is killed after the second checkpoint.
ARGS = [
    *SMALL,
    "--synthetic-train-size",
    "1024",
    "--synthetic-test-size",
    "256",
    "--epochs",
    "2",
    "--log-every",
    "4",
    "--checkpoint-every-steps",
    "4",
    "--checkpoint-every-minutes",
    "0",
]


def ray_processes(marker: str) -> list[int]:
    """PIDs of the processes whose command line names `marker` (this test's Ray temp directory)."""
    found = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker.encode() in (d / "cmdline").read_bytes():
                    found.append(int(d.name))
            except OSError:
                pass
    return found


def driver_alive(driver: subprocess.Popen, log: Path, condition):
    """`condition`, failing the test at once when the Ray driver has exited."""

    def check():
        if driver.poll() is not None:
            pytest.fail(f"the Ray driver exited ({driver.returncode}):\n{log.read_text()[-5000:]}")
        return condition()

    return check


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "model.pt", weights_only=True)["model"]


@pytest.mark.timeout(1800)
def test_ray_worker_killed_mid_run_resumes_and_matches_torchrun(tmp_path):
    run, pids, log = tmp_path / "run", tmp_path / "pids", tmp_path / "driver.log"
    pids.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="dcnray", dir="/tmp")  # short: Ray's socket paths live under it
    flags = [*ARGS, "--wandb", "offline", "--out", run]
    env = clean_env(RAY_TMPDIR=ray_tmp, STEP_SLEEP="0.3", PID_DIR=str(pids), WANDB_MODE="offline")
    with open(log, "w") as f:
        driver = subprocess.Popen(
            [PY, DRIVER, tmp_path / "storage", "1", *map(str, flags)],
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # whatever Ray signals to its group or session never reaches pytest
        )
    try:
        metrics = run / "metrics.jsonl"
        # The second checkpoint is being written: Ray has long taken the first (each report waits for it).
        wait_until(
            driver_alive(
                driver, log, lambda: metrics.exists() and '"event": "checkpoint", "step": 8' in metrics.read_text()
            ),
            timeout=1200,  # Ray's start on a busy 2-core machine takes minutes
            what="second checkpoint",
        )
        assert ray_processes(ray_tmp), "Ray's processes do not name its temp directory: the leak check below is void"
        first = [p for p in pids.iterdir() if p.name.startswith("rank1-")]
        assert len(first) == 1, list(pids.iterdir())
        os.kill(int(first[0].name.split("-")[1]), signal.SIGKILL)
        driver.wait(timeout=900)
        text = log.read_text()
        assert driver.returncode == 0, text[-5000:]
        # Ray restarted the group (a second rank-1 worker) and the run resumed from its checkpoint.
        assert len([p for p in pids.iterdir() if p.name.startswith("rank1-")]) == 2, list(pids.iterdir())
        resumes = read_events(run, "resume")
        assert len(resumes) == 1 and 4 <= resumes[0]["step"] < 32, resumes
        # from Ray's copy, not the run directory's (metrics.jsonl drops the path once Ray prunes that copy)
        assert f"resumed from {tmp_path / 'storage'}" in text, text[-5000:]
        result = json.loads(next(line for line in text.splitlines() if line.startswith('{"metrics"')))
        s = read_summary(run)
        assert (s["world_size"], s["backend"], s["steps"], s["epochs"]) == (2, "gloo", 32, 2), s
        assert result["metrics"]["test_accuracy"] == s["test_accuracy"] and result["metrics"]["final"], result
        assert len({d.name.rsplit("-", 1)[1] for d in offline_run_dirs(run)}) == 1  # one W&B run, resumed
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        # Ray shut down by the driver leaves nothing behind (whatever is left is killed, by PID, and fails the test)
        with contextlib.suppress(TimeoutError):
            wait_until(lambda: not ray_processes(ray_tmp), timeout=60, what="the end of Ray's processes")
        left = ray_processes(ray_tmp)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left, f"Ray processes left running: {left}"

    torchrun(
        2,
        [*ARGS, "--wandb", "disabled", "--out", tmp_path / "torchrun"],
        env=clean_env(OMP_NUM_THREADS="1"),
        timeout=300,
        check=0,
    )
    w_ray, w_torchrun = weights(run), weights(tmp_path / "torchrun")
    assert w_ray.keys() == w_torchrun.keys()
    diff = max((w_ray[k].float() - w_torchrun[k].float()).abs().max().item() for k in w_ray)
    assert diff <= 1e-5, diff
