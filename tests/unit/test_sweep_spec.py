"""The sweep spec (dist_cnn/sweep/spec.py): the documented form loads; every bad spec is one line (a
UserError) naming what is wrong, found by the config fields' own validation; the trial's config files."""

from __future__ import annotations

import pytest

from dist_cnn import config as C
from dist_cnn.errors import UserError
from dist_cnn.sweep import spec as S
from dist_cnn.sweep import tomlfile
from dist_cnn.sweep.trialfiles import TrialFiles, rerun_config, trial_config

DOC_SPEC = """
[data]
dataset = "synthetic"
[train]
epochs = 2
[sweep]
trials = 6
objective = "test_accuracy"
direction = "maximize"
[sweep.space]
"optim.lr" = { low = 0.01, high = 1.0, log = true }
"optim.weight_decay" = { low = 1e-5, high = 1e-3, log = true }
"train.batch_size" = { choices = [32, 64] }
"""


def write(tmp_path, text, name="spec.toml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def test_the_documented_spec_loads(tmp_path):
    spec = S.load(write(tmp_path, DOC_SPEC))
    assert (spec.trials, spec.objective, spec.direction, spec.sampler, spec.pruner) == (
        6,
        "test_accuracy",
        "maximize",
        "tpe",
        {"name": "median"},
    )
    assert [(d.key, d.kind, d.log) for d in spec.space] == [
        ("optim.lr", "float", True),
        ("optim.weight_decay", "float", True),
        ("train.batch_size", "choices", False),
    ]
    assert spec.base["data"]["dataset"] == "synthetic" and spec.base["train"]["epochs"] == 2.0
    assert S.Spec.from_dict(spec.to_dict()) == spec


def test_base_options_from_a_config_file_and_flags(tmp_path):
    write(tmp_path, "[train]\nepochs = 3\nseed = 5\n", "base.toml")
    text = DOC_SPEC.replace("[train]\nepochs = 2\n", "").replace(
        "[sweep]\n", '[sweep]\nconfig = "base.toml"\nargs = ["--seed", "7", "--no-flip"]\n'
    )
    spec = S.load(write(tmp_path, text))
    assert (spec.base["train"]["epochs"], spec.base["train"]["seed"]) == (3.0, 7)


BAD = [
    ('"optim.lrr" = { low = 0.1, high = 1.0 }', "unknown option 'optim.lrr'"),
    ('"lr" = { low = 0.1, high = 1.0 }', "unknown option 'lr'"),
    ('"optim.lr" = { low = -1.0, high = 1.0 }', "sweep.space.optim.lr: --lr must be positive, got -1.0"),
    ('"optim.momentum" = { low = 0.5, high = 1.0 }', "--momentum must be < 1, got 1.0"),
    ('"train.batch_size" = { choices = [32, 0] }', "--batch-size must be positive, got 0"),
    ('"train.precision" = { choices = ["fp32", "fp8"] }', "'fp8' is not one of"),
    ('"train.batch_size" = { choices = [32.5] }', "--batch-size must be int"),
    ('"optim.lr" = { low = 1.0, high = 0.1 }', "low must be smaller than high"),
    ('"optim.weight_decay" = { low = 0.0, high = 0.1, log = true }', "log-scale range needs low > 0"),
    ('"optim.lr" = { low = 0.1 }', "needs both low and high"),
    ('"optim.lr" = { low = 0.1, high = 1.0, scale = "log" }', "unknown key 'scale'"),
    ('"train.precision" = { low = 1, high = 2 }', "is not a number"),
    ('"optim.lr" = 0.1', "expected a table"),
]


@pytest.mark.parametrize("line,message", BAD, ids=[m for _, m in BAD])
def test_bad_space(tmp_path, line, message):
    text = DOC_SPEC.split("[sweep.space]")[0] + "[sweep.space]\n" + line + "\n"
    with pytest.raises(UserError, match=None) as e:
        S.load(write(tmp_path, text))
    assert message in str(e.value) and "\n" not in str(e.value)


SWEEP_BAD = [
    ('objective = "val_loss"', "'val_loss' is not a recorded metric"),
    ('objective = "ema_test_accuracy"', "only with train.model_ema"),
    ('direction = "up"', "direction must be maximize or minimize"),
    ('sampler = "cmaes"', "sampler must be one of"),
    ('pruner = "asha"', "pruner must be one of"),
    ("trials = 0", "trials must be an integer >= 1"),
    ("trial = 3", "sweep.trial: unknown key"),
    ('sampler = "grid"', "the grid sampler needs choices or a range with a step"),
    ('args = ["--lr", "-3"]', "--lr must be positive"),
    ('args = ["--no-such-flag"]', "unrecognized arguments"),
    ('config = "missing.toml"', "config file not found"),
    ('enqueue = [{ "optim.lr" = 0.0 }]', "--lr must be positive"),
]


def with_sweep_line(line: str) -> str:
    """DOC_SPEC with `line` in its [sweep] table instead of the key it sets."""
    key = line.split("=")[0].strip()
    kept = [x for x in DOC_SPEC.splitlines() if x.split("=")[0].strip() != key or x.startswith('"')]
    return "\n".join(kept).replace("[sweep]", f"[sweep]\n{line}") + "\n"


@pytest.mark.parametrize("line,message", SWEEP_BAD, ids=[m for _, m in SWEEP_BAD])
def test_bad_sweep_table(tmp_path, line, message):
    with pytest.raises(UserError) as e:
        S.load(write(tmp_path, with_sweep_line(line)))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_base_options_and_no_sweep_table(tmp_path):
    with pytest.raises(UserError, match="unknown key train.epoch "):
        S.load(write(tmp_path, DOC_SPEC.replace("epochs = 2", "epoch = 2")))
    with pytest.raises(UserError, match="no \\[sweep\\] table"):
        S.load(write(tmp_path, "[train]\nepochs = 1\n"))


def test_grid_of_choices_and_stepped_ranges(tmp_path):
    text = DOC_SPEC.split("[sweep.space]")[0].replace("[sweep]\n", '[sweep]\nsampler = "grid"\n')
    text += '[sweep.space]\n"train.epochs" = { low = 1, high = 3, step = 1 }\n"train.batch_size" = { choices = [32] }\n'
    spec = S.load(write(tmp_path, text))
    assert [d.grid() for d in spec.space] == [[1.0, 2.0, 3.0], [32]]


def test_trial_config_round_trips_and_reruns_as_a_plain_run(tmp_path):
    spec = S.load(write(tmp_path, DOC_SPEC))
    files = TrialFiles(tmp_path / "sweep", 3)
    cfg = trial_config(spec.base, {"optim.lr": 0.123456789, "train.batch_size": 64}, files, "s")
    path = tmp_path / "t.toml"
    tomlfile.write(path, cfg, header="x")
    back = C.from_dict(C.load_file(str(path)))
    assert (back.optim.lr, back.train.batch_size, back.ckpt.resume) == (0.123456789, 64, "auto")
    assert back.log.out.endswith("sweep/trials/0003") and back.log.wandb_group == "s"
    rerun = C.from_dict(rerun_config(C.to_dict(back)))
    assert (rerun.log.out, rerun.ckpt.resume, rerun.optim.lr) == ("", "none", 0.123456789)
    C.validate(rerun)
