"""Resume keeps every option that decides the results (one line when one is given with another
value), takes the checkpoint's value where none is given, and a resume into a new --out is a new
W&B run. In-process, through the Python API (the CLI builds the same Trainer)."""

from __future__ import annotations

import json

import pytest

from dist_cnn import fit
from dist_cnn.errors import UserError
from dist_cnn.train.resume_rules import MAY_CHANGE, fixed_options

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")

BASE = dict(
    synthetic_train_size=64,
    synthetic_test_size=32,
    batch_size=16,
    epochs=2,
    wandb="disabled",
    progress=False,
)


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    out = tmp_path_factory.mktemp("first") / "run"
    fit("seed", train="synthetic", **BASE, max_steps=2, lr=0.05, seed=3, precision="fp32", out=str(out))
    return out / "checkpoints" / "step-00000002.pt"


@pytest.mark.parametrize(
    "option,value,words",
    [
        ("seed", 4, "the checkpoint is for --seed 3, this run has --seed 4"),
        ("lr", 0.1, "the checkpoint is for --lr 0.05, this run has --lr 0.1"),
        ("precision", "bf16", "--precision fp32, this run has --precision bf16"),
        ("loader", "dataloader", "--loader auto, this run has --loader dataloader"),
        ("model_ema", True, "--model-ema False, this run has --model-ema True"),
        ("flip", True, "--flip cannot change on resume"),
        ("batch_size", 32, "--batch-size 16"),
        ("synthetic_train_size", 128, "--synthetic-train-size 64"),
    ],
)
def test_a_fixed_option_given_with_another_value_is_one_line(first, tmp_path, option, value, words):
    with pytest.raises(UserError) as e:
        fit("seed", train="synthetic", **{**BASE, option: value}, resume=str(first), out=str(tmp_path / "r"))
    assert words in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_a_checkpoint_past_the_end_of_the_run_is_one_line(first, tmp_path):
    with pytest.raises(UserError) as e:
        fit("seed", train="synthetic", **BASE, resume=str(first), max_steps=1, out=str(tmp_path / "r"))
    assert "past the end" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_another_model_is_one_line(first, tmp_path):
    with pytest.raises(UserError, match="the checkpoint is for --model seed, this run has --model resnet18"):
        fit("resnet18", train="synthetic", **BASE, resume=str(first), out=str(tmp_path / "r"))


def test_the_recorded_value_is_the_value_used_and_a_new_out_is_a_new_wandb_run(first, tmp_path, capsys):
    out = tmp_path / "r"
    summary = fit("seed", train="synthetic", **BASE, resume=str(first), max_steps=4, out=str(out))
    assert summary["steps"] == 4
    used = json.loads((out / "config.json").read_text())
    assert (used["optim"]["lr"], used["train"]["seed"], used["train"]["precision"]) == (0.05, 3, "fp32")
    captured = capsys.readouterr()
    assert "into a new --out" in captured.out + captured.err and "a new W&B run" in captured.out + captured.err
    assert summary["precision"] == "fp32"


def test_resuming_a_run_naming_its_model_module_needs_trust(tmp_path, monkeypatch):
    """The checkpoint's model spec is built only when --model names it or --trust-model-code is given."""
    (tmp_path / "mymodels.py").write_text(
        "import pathlib\npathlib.Path('IMPORTED').touch()\nfrom dist_cnn.models.registry import SeedNet as Net\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    fit("mymodels:Net", train="synthetic", **BASE, max_steps=1, out="a")
    (tmp_path / "IMPORTED").unlink()
    import sys

    sys.modules.pop("mymodels", None)
    from dist_cnn import config
    from dist_cnn.train.trainer import train

    argv = ["--resume", "a/checkpoints/step-00000001.pt", "--out", "b"]
    cfg = config.from_args(config.train_parser().parse_args(argv))
    with pytest.raises(UserError, match="asks to import module 'mymodels'"):
        train(cfg)
    assert not (tmp_path / "IMPORTED").exists()


def test_the_table_covers_every_option():
    assert set(fixed_options()) | MAY_CHANGE >= {"train.seed", "optim.lr", "log.out", "data.workers"}
    assert not {"train.seed", "optim.lr", "train.precision", "data.loader", "train.batch_size"} & MAY_CHANGE
