"""Bad input: one line on stderr, exit code 2, no traceback, nothing already written overwritten."""

import pytest

from tests.support.common import SMALL, assert_one_line_error, read_summary, train


# Every bad flag and config file is checked in-process (tests/unit/test_cli_bad_input.py); these are
# the real process's exit code and stderr, one case of each kind: argparse's own refusal, a value
# refused by the checks, a config file that does not parse.
@pytest.mark.parametrize(
    "args,needle",
    [
        (["--lr", "abc"], "invalid float value"),
        (["--model", "vgg"], "unknown model 'vgg'; known models: airbench, resnet18, seed, or a spec"),
    ],
)
def test_bad_flags(tmp_path, args, needle):
    p = train([*SMALL, "--out", tmp_path / "run", *args])
    assert_one_line_error(p, needle)


def test_bad_config_file(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[train\nepochs = 3\n")
    assert_one_line_error(train(["--config", cfg, "--out", tmp_path / "run"]), "c.toml")


@pytest.mark.slow
def test_finished_run_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    train([*SMALL, "--max-steps", "3", "--out", out], check=0)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    p = train([*SMALL, "--max-steps", "3", "--out", out])
    assert_one_line_error(p, "already holds a finished run")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert read_summary(out)["steps"] == 3


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
