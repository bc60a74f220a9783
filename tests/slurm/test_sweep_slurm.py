"""`dist-cnn sweep --launch slurm` on the local SLURM cluster: every trial an `sbatch slurm/train.sh` job;
one trial's job is sent SIGUSR1 (what --signal=B:USR1@120 does before a time limit), checkpoints,
requeues itself, resumes, and is reported to the study once."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import optuna
import pytest

from tests.slurm.helpers import cluster_env, job_info, job_state, scancel, wait_for_file_text
from tests.support.common import ROOT, clean_env, read_events

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SPEC = """
[data]
dataset = "synthetic"
synthetic_train_size = 256
synthetic_test_size = 128
[train]
epochs = 2
batch_size = 32
precision = "fp32"
log_every = 1
[ckpt]
every_minutes = 0.0
[log]
wandb = "disabled"
[sweep]
trials = 3
sampler = "random"
pruner = "none"
[sweep.space]
"optim.lr" = { low = 0.05, high = 0.2, log = true }
"""
ONE_TASK = ["--gpus-per-node=0", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=00:10:00"]


def test_sweep_on_slurm_with_a_requeued_trial(slurm_cluster, tmp_path):
    spec, out = tmp_path / "spec.toml", tmp_path / "sweep"
    spec.write_text(SPEC)
    env = cluster_env(
        clean_env(
            DIST_CNN_PYTHON=sys.executable,
            DIST_CNN_ENTRY=str(ROOT / "tests/support/slow_train.py"),
            STEP_SLEEP="0.3",
        )
    )
    cmd = [sys.executable, "-m", "dist_cnn.cli", "sweep", str(spec), "--out", str(out), "--launch", "slurm"]
    cmd += ["--parallel", "2", *(f"--sbatch={o}" for o in ONE_TASK)]
    log = tmp_path / "driver.log"
    with open(log, "w") as f:
        driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_for_file_text(out / "trials/0000.job", r"\d+", timeout=300)
        job = (out / "trials/0000.job").read_text().strip()
        wait_for_file_text(out / "trials/0000/metrics.jsonl", r'"event": "train"', timeout=300, job_id=job)
        scancel(job, "USR1", batch=True)
        assert driver.wait(timeout=600) == 0, log.read_text()[-4000:]
    finally:
        if driver.poll() is None:
            driver.kill()
        for p in (out / "trials").glob("*.job"):
            if job_state(p.read_text().strip()) is not None:
                scancel(p.read_text().strip())
    text = log.read_text()

    record = json.loads((out / "sweep.json").read_text())
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(record["storage"].removeprefix("journal:"))
    )
    trials = optuna.load_study(study_name=record["name"], storage=storage).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3, text
    for t in trials:
        assert len(re.findall(rf"trial {t.number} (complete|pruned|failed)", text)) == 1, text
    assert job_info(job)["Restarts"] == "1", (job_info(job), (out / "trials/0000.log").read_text()[-3000:])
    run = out / "trials/0000"
    resumes = read_events(run, "resume")
    assert len(resumes) == 1 and resumes[0]["step"] > 0, resumes
    evals = read_events(run, "eval")
    assert [e["step"] for e in evals] == [8, 16]
    assert trials[0].intermediate_values == {e["step"]: e["test_accuracy"] for e in evals}
    assert trials[0].value == json.loads((run / "summary.json").read_text())["test_accuracy"]
