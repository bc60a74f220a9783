"""Bad input: one line on stderr, exit code 2, no traceback, nothing already written overwritten."""

import pytest

from tests.support.common import SMALL, assert_one_line_error, read_summary, train


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--dataset", "imagenet"], "invalid choice"),
        (["--model", "vgg"], "unknown model 'vgg'; known models: airbench, resnet18, seed, or a spec"),
        (["--epochs", "0"], "--epochs must be positive"),
        (["--epochs", "-3"], "--epochs must be positive"),
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--lr", "-0.1"], "--lr must be positive"),
        (["--lr", "abc"], "invalid float value"),
        (["--dataset", "imagefolder", "--data-dir", "/nonexistent/dir"], "/nonexistent/dir"),
        (["--dataset", "cifar10", "--data-dir", "/nonexistent/dir", "--no-download"], "--data-dir"),
        (["--config", "/nonexistent.toml"], "config file not found"),
    ],
)
def test_bad_flags(tmp_path, args, needle):
    p = train([*SMALL, "--out", tmp_path / "run", *args])
    assert_one_line_error(p, needle)


def test_cifar_missing_names_data_dir_and_synthetic(tmp_path):
    p = train(["--dataset", "cifar10", "--data-dir", tmp_path / "empty", "--no-download", "--out", tmp_path / "r"])
    assert_one_line_error(p, "--data-dir", "synthetic")


@pytest.mark.parametrize(
    "text,needle",
    [
        ("[train]\nepochz = 3\n", "unknown key train.epochz"),
        ("[trian]\nepochs = 3\n", "unknown section"),
        ('[train]\nepochs = "three"\n', "train.epochs must be float"),
        ("[optim]\nlr = true\n", "optim.lr must be float"),
        ("[train\nepochs = 3\n", "c.toml"),
    ],
)
def test_bad_config_file(tmp_path, text, needle):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    assert_one_line_error(train(["--config", cfg, "--out", tmp_path / "run"]), needle)


def test_yaml_config_unknown_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  datasett: synthetic\n")
    assert_one_line_error(train(["--config", cfg, "--out", tmp_path / "run"]), "unknown key data.datasett")


def test_finished_run_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    train([*SMALL, "--max-steps", "3", "--out", out], check=0)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    p = train([*SMALL, "--max-steps", "3", "--out", out])
    assert_one_line_error(p, "already holds a finished run")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert read_summary(out)["steps"] == 3


def test_batch_not_divisible_by_world_is_an_error(tmp_path):
    p = train([*SMALL, "--batch-size", "63", "--grad-accum", "2", "--out", tmp_path / "r"])
    assert_one_line_error(p, "--batch-size 63")


def test_help_documents_every_option_with_default():
    from dist_cnn.config import train_parser

    text = train_parser().format_help()
    for flag in [
        "--config",
        "--dataset",
        "--data-dir",
        "--model",
        "--epochs",
        "--batch-size",
        "--lr",
        "--seed",
        "--precision",
        "--out",
        "--wandb",
        "--no-progress",
        "--resume",
        "--keep-checkpoints",
    ]:
        assert flag in text, flag
    helps = [a for a in train_parser()._actions if a.dest not in ("help", "config")]
    assert all("(default:" in a.help for a in helps)
