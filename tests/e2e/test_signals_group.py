"""A stop signal to the whole process group (Ctrl-C in a terminal, scancel, a SLURM time limit) reaches
the DataLoader workers too: they ignore it, the ranks checkpoint and exit 130 (SIGINT) or 143
(SIGTERM), and the run resumes exactly. 1 rank, and 2 ranks under torchrun, every loader."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest
import torch

from tests.support.common import PY, ROOT, clean_env, read_summary, train

from .test_reliability import events, wait_for

pytestmark = pytest.mark.slow

SLOW_TRAIN = ROOT / "tests" / "support" / "slow_train.py"
BASE = [
    "--batch-size",
    "16",
    "--epochs",
    "3",
    "--log-every",
    "1",
    "--wandb",
    "disabled",
    "--no-progress",
    "--precision",
    "fp32",
    "--eval-every",
    "0",
]
SYNTHETIC = ["--dataset", "synthetic", "--synthetic-train-size", "144", "--synthetic-test-size", "32", *BASE]


def stream_args(folder):
    return ["--dataset", "imagefolder", "--data-dir", str(folder), "--loader", "stream", "--workers", "1", *BASE]


def start_group(nproc: int, args) -> subprocess.Popen:
    """Its own process group (session), as a shell job or a SLURM step is."""
    launch = [SLOW_TRAIN] if nproc == 1 else ["-m", "dist_cnn.distributed.torchrun", "--standalone"]
    if nproc > 1:
        launch += [f"--nproc_per_node={nproc}", SLOW_TRAIN]
    return subprocess.Popen(
        [PY, *map(str, launch), *map(str, args)],
        cwd=ROOT,
        env=clean_env(OMP_NUM_THREADS="1", STEP_SLEEP="0.4"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def stop_group(nproc: int, args, out, sig: int) -> tuple[int, str]:
    proc = start_group(nproc, [*args, "--out", out])
    wait_for(lambda: events(out, "train"), proc=proc)
    os.killpg(proc.pid, sig)  # kill -SIG -- -PGID
    _, stderr = proc.communicate(timeout=180)
    return proc.returncode, stderr


def assert_checkpointed(out, code, stderr, sig):
    assert code == 128 + sig, stderr
    assert "Traceback" not in stderr and "DataLoader worker" not in stderr, stderr
    saved = events(out, "checkpoint")
    assert saved and (out / "checkpoints" / f"step-{saved[-1]['step']:08d}.pt").exists(), stderr
    assert not (out / "summary.json").exists()
    if sig == signal.SIGINT:
        assert stderr.count("Ctrl-C again") == 1, stderr  # rank 0 says it, once


def weights(out) -> dict:
    return torch.load(out / "model.pt", weights_only=True)["model"]


def test_sigterm_to_the_group_with_dataloader_workers_checkpoints_and_resumes_exactly(tmp_path):
    args = [*SYNTHETIC, "--loader", "dataloader", "--workers", "2"]
    train([*args, "--out", tmp_path / "ref"], check=0)
    out = tmp_path / "run"
    code, stderr = stop_group(1, args, out, signal.SIGTERM)
    assert_checkpointed(out, code, stderr, signal.SIGTERM)
    train([*args, "--out", out, "--resume", "auto"], check=0)
    assert read_summary(out)["steps"] == read_summary(tmp_path / "ref")["steps"]
    ref, resumed = weights(tmp_path / "ref"), weights(out)
    assert max((ref[k] - resumed[k]).abs().max().item() for k in ref) <= 1e-6  # as test_checkpoint's


def test_sigint_to_the_group_with_stream_workers_checkpoints(tmp_path, image_folder):
    out = tmp_path / "run"
    code, stderr = stop_group(1, stream_args(image_folder), out, signal.SIGINT)
    assert_checkpointed(out, code, stderr, signal.SIGINT)


@pytest.mark.parametrize("loader,sig", [("dataloader", signal.SIGINT), ("stream", signal.SIGTERM)])
def test_two_ranks_under_torchrun_checkpoint_on_a_group_signal(tmp_path, image_folder, loader, sig):
    args = (
        [*SYNTHETIC, "--loader", "dataloader", "--workers", "1"]
        if loader == "dataloader"
        else stream_args(image_folder)
    )
    out = tmp_path / "run"
    code, stderr = stop_group(2, args, out, sig)
    assert_checkpointed(out, code, stderr, sig)
    assert f"torchrun: stopped by {signal.Signals(sig).name}" in stderr


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def test_a_killed_dataloader_worker_is_one_line(tmp_path):
    out = tmp_path / "run"
    proc = start_group(1, [*SYNTHETIC, "--loader", "dataloader", "--workers", "2", "--out", out])
    wait_for(lambda: events(out, "train") and children(proc.pid), proc=proc)
    os.kill(children(proc.pid)[0], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=180)
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and "Traceback" not in stderr, stderr
    assert len(lines) == 1 and "DataLoader worker" in lines[0] and "--resume auto" in lines[0], lines
