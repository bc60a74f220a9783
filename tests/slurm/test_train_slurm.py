"""slurm/train.sh on the local SLURM cluster (tests/slurm/README.md): both launch modes train to the
end, USR1 checkpoints + requeues + resumes with the same step count, a plain scancel (TERM) does not
requeue, and launches that cannot work fail fast with one line (dist_cnn/commands/doctor.py, dist_cnn/distributed/).

Every job gets 2 tasks of 1 CPU on the CPU-only node (--gpus-per-node=0), so gloo, 2 ranks.
"""

from __future__ import annotations

import json
import socket
import sys
import time

import pytest

from tests.slurm.helpers import (
    TRAIN_SH,
    cluster_env,
    job_info,
    job_state,
    sbatch,
    scancel,
    wait_for_file_text,
    wait_job,
)
from tests.support.common import ROOT, SMALL, clean_env, read_events, read_summary

pytestmark = pytest.mark.slurm

PY = sys.executable  # the venv's python when run as `.venv/bin/python -m pytest`
TWO_TASKS = ["--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1"]

# train.py with a fixed sleep (STEP_SLEEP) in every optimizer step, so a run lasts long enough to be interrupted
SLOW_TRAIN = ROOT / "tests" / "support" / "slow_train.py"


def job_env(mode: str = "srun", entry=None, **extra) -> dict:
    """The job's environment: no SLURM_*/RANK leftovers from this shell, the venv's python, the mode."""
    return cluster_env(
        clean_env(DIST_CNN_PYTHON=PY, DIST_CNN_ENTRY=str(entry or ROOT / "train.py"), DIST_CNN_LAUNCH=mode, **extra)
    )


def out_file(tmp_path, job) -> str:
    p = tmp_path / f"slurm-dist_cnn-{job}.out"
    return p.read_text(errors="replace") if p.exists() else ""


def cancel_leftovers(jobs):
    """After a failed test (-x): jobs still queued or running are cancelled, not left to the next test."""
    for job in jobs:
        if job_state(job) is not None:
            scancel(job)


def assert_done(info, text, state="COMPLETED", exit_code="0:0"):
    assert (info["JobState"], info["ExitCode"]) == (state, exit_code), (info, text[-4000:])


MODES = ["torchrun", "srun"]


@pytest.fixture(scope="module")
def completed_jobs(slurm_cluster, tmp_path_factory):
    """One small run per launch mode, submitted together (they share the node): mode -> (job, dir)."""
    jobs = {}
    for mode in MODES:
        d = tmp_path_factory.mktemp(f"complete-{mode}")
        jobs[mode] = sbatch([*TWO_TASKS, TRAIN_SH, *SMALL, "--out", d / "run"], cwd=d, env=job_env(mode)), d
    yield jobs
    cancel_leftovers(job for job, _ in jobs.values())


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_train_sh_completes(completed_jobs, mode):
    job, d = completed_jobs[mode]
    run = d / "run"
    info = wait_job(job, timeout=180)
    text = out_file(d, job)
    assert_done(info, text)
    assert f"launch={mode}" in text and "restart 0" in text
    assert info["Restarts"] == "0"
    assert [p.parent for p in d.rglob("summary.json")] == [run]
    s = read_summary(run)
    assert (s["world_size"], s["backend"], s["epochs"], s["steps"]) == (2, "gloo", 1, 2048 // 64)


def submit_slow_run(d, mode, step_sleep="0.4"):
    """A 2-epoch run of 2 x 16 steps, slowed down to ~0.4 s a step; returns (job, run dir)."""
    run = d / "run"
    args = [
        *SMALL,
        "--synthetic-train-size",
        "1024",
        "--epochs",
        "2",
        "--log-every",
        "2",
        "--checkpoint-every-minutes",
        "0",
        "--out",
        run,
    ]
    return sbatch([*TWO_TASKS, TRAIN_SH, *args], cwd=d, env=job_env(mode, SLOW_TRAIN, STEP_SLEEP=step_sleep)), run


def wait_training(job, run):
    # The trainer installs its handler before the first step, so a train event means USR1 is handled.
    wait_for_file_text(run / "metrics.jsonl", r'"event": "train"', timeout=120, job_id=job)


@pytest.fixture(scope="module")
def preempted_jobs(slurm_cluster, tmp_path_factory):
    """A slow run per launch mode, submitted together and sent USR1 once training has started
    (each requeue waits ~12 s, so the two overlap): mode -> (job, dir, run dir)."""
    jobs = {}
    for mode in MODES:
        d = tmp_path_factory.mktemp(f"preempt-{mode}")
        jobs[mode] = (d, *submit_slow_run(d, mode))
    for _, job, run in jobs.values():
        wait_training(job, run)
        scancel(job, "USR1", batch=True)  # what --signal=B:USR1@120 does before the time limit
    yield jobs
    cancel_leftovers(job for _, job, _ in jobs.values())


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_usr1_checkpoints_requeues_and_resumes(preempted_jobs, mode):
    d, job, run = preempted_jobs[mode]
    info = wait_job(job, timeout=240)
    text = out_file(d, job)
    assert_done(info, text)
    assert info["Restarts"] == "1", (info, text[-4000:])
    # Restarts=1 proves the requeue; rank 0's "requeued SLURM job" line can lose the race against the
    # SIGTERM that `scontrol requeue` sends to the whole job, so it is not required here.
    assert "batch shell got SIGUSR1" in text
    assert "restart 1" in text  # the rerun saw SLURM_RESTART_COUNT=1 (train.sh's first line)
    resumes = read_events(run, "resume")
    assert len(resumes) == 1 and resumes[0]["step"] > 0, resumes
    s = read_summary(run)
    assert (s["epochs"], s["steps"], s["world_size"]) == (2, 2 * (1024 // 64), 2)
    # The checkpoint was written at the signal, not by the clock: it holds the resume step.
    # metrics.jsonl names the checkpoint it resumed from until pruning removes that file
    assert resumes[0].get("pruned") or f"step-{resumes[0]['step']:08d}.pt" in resumes[0]["from"], resumes
    assert "terminate called" not in text, text[-4000:]


@pytest.mark.slow
def test_plain_scancel_checkpoints_and_does_not_requeue(slurm_cluster, tmp_path):
    job, run = submit_slow_run(tmp_path, "srun")
    wait_training(job, run)
    scancel(job)  # SIGTERM to every process: a job cancelled for good
    info = wait_job(job, timeout=90)
    text = out_file(tmp_path, job)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", (info, text[-4000:])
    assert "requeued SLURM job" not in text
    assert list((run / "checkpoints").glob("step-*.pt")), text[-4000:]
    assert not (run / "summary.json").exists()
    time.sleep(1)
    assert job_info(job)["Restarts"] == "0"


def test_batch_script_without_srun_fails_fast(slurm_cluster, tmp_path):
    """SLURM_NTASKS=2 in the batch shell, but no step: one line naming srun, exit code 2."""
    job = sbatch(
        [
            "--ntasks=2",
            "--gpus-per-node=0",
            "--output=out-%j.txt",
            "--wrap",
            f"{PY} {ROOT / 'train.py'} {' '.join(SMALL)} --out {tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env=job_env(),
    )
    info = wait_job(job, timeout=90)
    text = (tmp_path / f"out-{job}.txt").read_text()
    assert info["ExitCode"] == "2:0" and info["JobState"] == "FAILED", (info, text)
    errors = [ln for ln in text.splitlines() if "error:" in ln]
    assert len(errors) == 1 and "srun" in errors[0] and "Traceback" not in text, text
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_torchrun_more_processes_than_allocated_fails_fast(slurm_cluster, tmp_path):
    """DIST_CNN_NPROC_PER_NODE=3 on a node given 2 tasks of 1 CPU: every worker refuses in one line."""
    job = sbatch(
        [*TWO_TASKS, TRAIN_SH, *SMALL, "--out", tmp_path / "run"],
        cwd=tmp_path,
        env=job_env("torchrun", DIST_CNN_NPROC_PER_NODE="3"),
    )
    info = wait_job(job, timeout=120)
    text = out_file(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", (info, text[-4000:])
    errors = [ln for ln in text.splitlines() if "] error: " in ln]
    assert errors and all(
        "3 processes on this node" in e and "2 CPU(s)" in e and "DIST_CNN_NPROC_PER_NODE" in e for e in errors
    ), text[-4000:]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_srun_mode_port_in_use_fails_fast(slurm_cluster, tmp_path):
    """MASTER_PORT held by another process on the head node: rank 0 says so; --kill-on-bad-exit ends rank 1."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        job = sbatch(
            [*TWO_TASKS, TRAIN_SH, *SMALL, "--out", tmp_path / "run"],
            cwd=tmp_path,
            env=job_env("srun", MASTER_PORT=str(port)),
        )
        info = wait_job(job, timeout=90)
    text = out_file(tmp_path, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0", (info, text[-4000:])
    errors = [ln for ln in text.splitlines() if "error: " in ln and "srun:" not in ln]
    assert any(f"MASTER_PORT {port} (from the environment) is already in use" in e for e in errors), text[-4000:]


@pytest.mark.slow
def test_dry_run_inside_a_job(slurm_cluster, tmp_path):
    """`train.py --dry-run` in the batch shell (a problem: no srun) and under srun (two ranks, exit 0)."""
    cmd = f"{PY} {ROOT / 'train.py'} --dry-run --json --dataset synthetic"
    job = sbatch(
        [*TWO_TASKS, "--output=out-%j.txt", "--wrap", f"{cmd} > batch.json; echo batch_rc=$?; srun {cmd}"],
        cwd=tmp_path,
        env=job_env(),
    )
    info = wait_job(job, timeout=90)
    text = (tmp_path / f"out-{job}.txt").read_text()
    assert_done(info, text)
    assert "batch_rc=2" in text
    batch = json.loads((tmp_path / "batch.json").read_text())
    assert batch["slurm"]["step_id"] is None and "srun" in batch["problems"][0]
    ranks = sorted((json.loads(ln) for ln in text.splitlines() if ln.startswith("{")), key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1], text
    for r in ranks:
        assert (r["launcher"], r["world_size"], r["backend"], r["problems"]) == ("slurm", 2, "gloo", [])
        assert r["slurm"]["job_id"] == str(job) and r["slurm"]["restart_count"] == 0
        assert r["head"]["port"] == 20000 + job % 20000 and r["slurm"]["tasks_on_node"] == 2
        assert r["run_dir"] == f"runs/job{job}-seed-synthetic"
    assert not (tmp_path / "runs").exists()
