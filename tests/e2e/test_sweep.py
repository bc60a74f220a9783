"""`dist-cnn sweep` end to end on synthetic data: trials are real torchrun runs, the study a real Optuna
journal file. A sweep whose driver is SIGKILLed mid-way and started again completes every trial once,
with the same values on every rank; the pruner stops bad trials through the run's stop agreement;
best.toml trains the best trial again to the same accuracy; a diverging trial fails alone."""

from __future__ import annotations

import json
import re
import signal
import subprocess

import optuna
import pytest

from dist_cnn.sweep import spec as S
from dist_cnn.sweep import study as study_mod
from tests.support.common import PY, clean_env, read_events, read_summary, run_py, torchrun, wait_until
from tests.support.wandb_records import read_offline_run, read_records

# 256 images, 8 steps an epoch, an evaluation after each of 4 epochs: the pruner sees 3 before the end.
BASE = """
[data]
dataset = "synthetic"
synthetic_train_size = 256
synthetic_test_size = 128
[train]
epochs = 4
batch_size = 32
precision = "fp32"
log_every = 1
[log]
wandb = "disabled"
"""


def write_spec(tmp_path, sweep: str, name="spec.toml"):
    p = tmp_path / name
    p.write_text(BASE + sweep)
    return p


def sweep_cmd(spec, out, *flags):
    return [PY, "-m", "dist_cnn.cli", "sweep", str(spec), "--out", str(out), *map(str, flags)]


def sweep(spec, out, *flags, check=0, timeout=600):
    return run_py(["-m", "dist_cnn.cli", "sweep", spec, "--out", out, *flags], check=check, timeout=timeout)


def load(out):
    record = json.loads((out / "sweep.json").read_text())
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(record["storage"].removeprefix("journal:"))
    )
    return optuna.load_study(study_name=record["name"], storage=storage)


# A range whose low end learns nothing in 4 epochs; the first trial is a good one, so after it the
# median pruner (from its first complete trial on) stops the bad ones. Seed 3 samples lr 1.0e-3,
# 7.6e-3 and 3.9e-5 for trials 1-3: trials 0 and 1 run together, 2 and 3 take their slots as they end
# (the driver is killed while one of them trains), and trial 3 learns nothing.
PRUNED_SWEEP = """
[sweep]
trials = 4
sampler = "random"
seed = 3
pruner = { name = "median", n_startup_trials = 1 }
enqueue = [{ "optim.lr" = 0.1 }]
[sweep.space]
"optim.lr" = { low = 1e-6, high = 0.3, log = true }
"""


@pytest.mark.slow
def test_sweep_survives_a_killed_driver_prunes_and_reruns_the_best(tmp_path):
    spec, out = write_spec(tmp_path, PRUNED_SWEEP), tmp_path / "sweep"
    flags = ["--launch", "local", "--procs", "2", "--parallel", "2"]
    first_log = tmp_path / "driver1.log"
    with open(first_log, "w") as f:
        driver = subprocess.Popen(sweep_cmd(spec, out, *flags), stdout=f, stderr=subprocess.STDOUT, env=clean_env())

    # Kill it once a trial has ended and the trials after it are training.
    def busy():
        text = first_log.read_text()
        later = [int(n) for n in re.findall(r"trial (\d+) started", text)]
        metrics = [out / f"trials/{n:04d}/metrics.jsonl" for n in later[2:]]
        return re.search(r"trial \d+ (complete|pruned)", text) and any(
            m.is_file() and '"event": "train"' in m.read_text() for m in metrics
        )

    try:
        wait_until(busy, 400, "trial done and another training")
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    second = sweep(spec, out, *flags)
    text = first_log.read_text() + second.stdout

    study = load(out)
    trials = study.get_trials()
    assert sorted(t.number for t in trials) == list(range(4))
    states = [t.state.name for t in trials]
    assert set(states) <= {"COMPLETE", "PRUNED"}, (states, text)
    assert "PRUNED" in states and "COMPLETE" in states
    for t in trials:  # told once: one line of how it ended, across both drivers
        assert len(re.findall(rf"trial {t.number} (complete|pruned|failed)", text)) == 1, text
    assert "resumed" in second.stdout  # the killed driver's running trials went on from checkpoints

    for t in trials:
        run = out / f"trials/{t.number:04d}"
        config = json.loads((run / "config.json").read_text())
        assert config["optim"]["lr"] == t.params["optim.lr"]
        starts = read_events(run, "trial")
        assert starts and all(e["params"] == t.params for e in starts)
        assert all(ranks == t.params for e in starts for ranks in e["ranks"]) and len(starts[0]["ranks"]) == 2
        evals = [e["step"] for e in read_events(run, "eval")]
        assert evals == sorted(set(evals)), evals  # no step trained or evaluated twice
        assert t.intermediate_values == {e["step"]: e["test_accuracy"] for e in read_events(run, "eval")}
        if t.state.name == "PRUNED":
            assert not (run / "summary.json").exists() and read_events(run, "pruned")
            assert (run / "checkpoints").is_dir()

    best = out / "best.toml"
    assert best.is_file() and study.best_trial.state.name == "COMPLETE"
    rerun = tmp_path / "rerun"
    torchrun(2, ["--config", best, "--out", rerun], check=0)
    assert read_summary(rerun)["test_accuracy"] == study.best_value
    assert (out / "plots/optimization_history.png").is_file()
    report = run_py(["-m", "dist_cnn.cli", "sweep", "report", out], check=0).stdout
    assert report.splitlines()[1].split()[0] == str(study.best_trial.number)


DIVERGING_SWEEP = """
[sweep]
trials = 2
args = ["--wandb", "offline", "--epochs", "1"]
enqueue = [{ "optim.lr" = 1e8 }, { "optim.lr" = 0.1 }]
[sweep.space]
"optim.lr" = { choices = [0.1, 1e8] }
"""


@pytest.mark.slow
def test_a_diverging_trial_fails_alone_and_max_failures_ends_a_sweep(tmp_path):
    spec = write_spec(tmp_path, DIVERGING_SWEEP)
    p = sweep(spec, tmp_path / "a", "--parallel", "2")
    study = load(tmp_path / "a")
    failed, ok = sorted(study.get_trials(), key=lambda t: t.number)
    assert (failed.state.name, ok.state.name) == ("FAIL", "COMPLETE"), p.stdout
    assert failed.user_attrs["error"].startswith("loss was NaN/Inf"), failed.user_attrs
    assert "trial 0 failed: loss was NaN/Inf" in p.stdout
    # W&B: one run per trial, in the sweep's group, the trial's values in its config
    runs = [
        next(r.run for r in read_records(f) if r.WhichOneof("record_type") == "run")
        for n in (0, 1)
        for f in (tmp_path / f"a/trials/{n:04d}/wandb").glob("offline-run-*/run-*.wandb")
    ]
    assert [(r.run_group, r.display_name) for r in runs] == [("a", "a-0000"), ("a", "a-0001")]
    assert read_offline_run(tmp_path / "a/trials/0001")["config"]["optim"]["lr"] == 0.1

    p = sweep(spec, tmp_path / "b", "--max-failures", "1", check=1)
    # ended after the first failure: the second enqueued trial never started
    assert [t.state.name for t in load(tmp_path / "b").get_trials()] == ["FAIL", "WAITING"]
    assert "1 trials failed (--max-failures 1)" in p.stdout


@pytest.mark.slow
def test_bad_spec_is_one_line_before_any_trial(tmp_path):
    spec = write_spec(tmp_path, '[sweep]\ntrials = 2\n[sweep.space]\n"optim.lr" = { low = -1.0, high = 1.0 }\n')
    p = sweep(spec, tmp_path / "out", check=2)
    assert p.stderr.strip() == "error: sweep.space.optim.lr: --lr must be positive, got -1.0"
    assert not (tmp_path / "out").exists()
    p = sweep(spec, tmp_path / "out", "--procs", "0", check=2)
    assert p.stderr.count("\n") == 1 and "--procs" in p.stderr


def test_the_same_directory_refuses_another_spec(tmp_path):
    ok = write_spec(tmp_path, '[sweep]\ntrials = 1\n[sweep.space]\n"optim.lr" = { choices = [0.1] }\n', "a.toml")
    other = write_spec(tmp_path, '[sweep]\ntrials = 1\n[sweep.space]\n"optim.lr" = { choices = [0.2] }\n', "b.toml")
    # The first spec's study is created in-process (no trial needs to run), then a second spec refused.
    study_mod.open_sweep(tmp_path / "out", S.load(str(ok)), None, None)
    p = run_py(["-m", "dist_cnn.cli", "sweep", other, "--out", tmp_path / "out"], check=2)
    assert (
        p.stderr.strip()
        == f"error: --out {tmp_path / 'out'} holds a sweep of another spec; give the same spec, or another --out"
    )
