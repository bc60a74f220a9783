"""The sweep's small parts in-process: a pruned stop, the split of the machine between trials, how a
trial's files say it ended, the one-line error of a failed trial, and the report's order and best.toml."""

from __future__ import annotations

import json

import optuna
import pytest

from dist_cnn import config as C
from dist_cnn.distributed.preempt import StopSignal
from dist_cnn.errors import UserError
from dist_cnn.sweep import report, tomlfile
from dist_cnn.sweep import spec as S
from dist_cnn.sweep import study as study_mod
from dist_cnn.sweep.launch_local import make_slots
from dist_cnn.sweep.trialfiles import TrialFiles, error_line, outcome


def test_a_pruned_stop_is_a_stop_that_succeeds_without_requeue():
    s = StopSignal(announce=False)
    assert not s.requested
    s.prune()
    assert (s.requested, s.exit_code, s.wants_requeue) == (True, 0, False)


def test_slots_split_gpus_and_cores_between_trials():
    slots = make_slots(2, 2, gpus=["0", "1", "2", "3"], cores=[0, 1, 2, 3, 4, 5])
    assert [(s.gpus, s.cores) for s in slots] == [(["0", "1"], [0, 1, 2]), (["2", "3"], [3, 4, 5])]
    assert [s.cores for s in make_slots(2, 2, gpus=[], cores=[0, 1])] == [[0], [1]]
    assert [s.cores for s in make_slots(3, 1, gpus=[], cores=[0, 1])] == [[0], [1], [0]]  # shared when too few
    with pytest.raises(UserError, match="needs 4 GPUs; 2 are visible"):
        make_slots(2, 2, gpus=["0", "1"], cores=[0])


def test_outcome_and_error_line_from_the_trial_files(tmp_path):
    files = TrialFiles(tmp_path, 7)
    files.run_dir.mkdir(parents=True)
    assert outcome(files) == ("unfinished", None)
    files.log.write_text("epoch 1\n[rank 0] error: loss was NaN/Inf for 3 steps\nerror: later\n")
    assert error_line(files, "x") == "loss was NaN/Inf for 3 steps"
    assert error_line(TrialFiles(tmp_path, 8), "exit 1") == "exit 1"
    (files.run_dir / "metrics.jsonl").write_text(json.dumps({"event": "pruned", "step": 16}) + "\n")
    assert outcome(files) == ("pruned", {"event": "pruned", "step": 16})
    (files.run_dir / "summary.json").write_text('{"test_accuracy": 0.5}')
    assert outcome(files) == ("complete", {"test_accuracy": 0.5})


def test_report_sorts_by_the_objective_and_writes_best_toml(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", study_name="s")
    base = C.to_dict(C.Config())
    for value in (0.3, 0.9, None, 0.5):
        t = study.ask({"optim.lr": optuna.distributions.FloatDistribution(0.01, 1, log=True)})
        cfg = json.loads(json.dumps(base))
        cfg["optim"]["lr"] = t.params["optim.lr"]
        cfg["log"]["out"], cfg["ckpt"]["resume"] = str(tmp_path / f"trials/{t.number:04d}"), "auto"
        (tmp_path / "trials").mkdir(exist_ok=True)
        tomlfile.write(TrialFiles(tmp_path, t.number).config, cfg)
        if value is None:
            study.tell(t, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(t, value)
    lines = report.table(study, "test_accuracy").splitlines()
    assert [ln.split()[0] for ln in lines] == ["trial", "1", "3", "0", "2"]
    assert lines[4].split()[3] == "pruned"
    best = C.from_dict(C.load_file(str(report.write_best(tmp_path, study))))
    assert (best.optim.lr, best.log.out, best.ckpt.resume) == (study.best_params["optim.lr"], "", "none")


SPEC = """
[data]
dataset = "synthetic"
[sweep]
trials = 2
enqueue = [{ "optim.lr" = 0.08 }]
[sweep.space]
"optim.lr" = { low = 0.01, high = 1.0, log = true }
"""


@pytest.mark.parametrize("storage", [None, "sqlite"])
def test_the_same_directory_continues_the_same_study(tmp_path, storage):
    (tmp_path / "spec.toml").write_text(SPEC)
    spec = S.load(str(tmp_path / "spec.toml"))
    url = f"sqlite:///{tmp_path / 'x.db'}" if storage else None
    study, record = study_mod.open_sweep(tmp_path / "out", spec, url, None)
    assert record["name"] == "out" and record["storage"] == (url or f"journal:{tmp_path / 'out/journal.log'}")
    assert [t.system_attrs["fixed_params"] for t in study.get_trials()] == [{"optim.lr": 0.08}]  # enqueued once
    again, _ = study_mod.open_sweep(tmp_path / "out", spec, None, None)
    assert len(again.get_trials()) == 1 and again.study_name == "out"
    loaded, _ = study_mod.load_sweep(tmp_path / "out")
    assert loaded.study_name == "out"
    with pytest.raises(UserError, match="its study is named out, not other"):
        study_mod.open_sweep(tmp_path / "out", spec, None, "other")
