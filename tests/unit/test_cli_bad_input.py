"""Bad flags, config files and model specs given to `dist-cnn train`: one `error:` line on stderr,
exit code 2, no traceback. In-process through the command line's main(); tests/e2e/test_cli.py and
tests/e2e/test_any_model.py check the same contract through real processes for one case of each kind."""

from __future__ import annotations

import contextlib
import io
import sys

import pytest

from dist_cnn.commands import main
from tests.support.common import SMALL

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")


def run(argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def assert_one_line_error(result, *needles: str) -> None:
    code, err = result
    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    for n in needles:
        assert n in err, (n, err)


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
        (["--plots=yes"], "--plots/--no-plots"),
    ],
)
def test_bad_flags(tmp_path, args, needle):
    assert_one_line_error(run([*SMALL, "--out", tmp_path / "run", *args]), needle)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--lr", "inf"], "--lr must be a finite number"),
        (["--timeout", "inf"], "--timeout must be a finite number"),
        (["--log-every", "0"], "--log-every must be positive"),
        (["--synthetic-test-size", "0"], "--synthetic-test-size must be positive"),
        (["--image-size", "-4"], "--image-size must be >= 4"),
        (["--checkpoint-every-minutes", "nan"], "--checkpoint-every-minutes must be a finite number"),
    ],
)
def test_bad_values_write_nothing(tmp_path, args, needle):
    assert_one_line_error(run([*SMALL, "--out", tmp_path / "run", *args]), needle)
    assert not (tmp_path / "run").exists()


def test_cifar_missing_names_data_dir_and_synthetic(tmp_path):
    argv = ["--dataset", "cifar10", "--data-dir", tmp_path / "empty", "--no-download", "--out", tmp_path / "r"]
    assert_one_line_error(run(argv), "--data-dir", "synthetic")


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
    assert_one_line_error(run(["--config", cfg, "--out", tmp_path / "run"]), needle)


def test_yaml_config_unknown_key(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  datasett: synthetic\n")
    assert_one_line_error(run(["--config", cfg, "--out", tmp_path / "run"]), "unknown key data.datasett")


def test_batch_not_divisible_by_world_is_an_error(tmp_path):
    argv = [*SMALL, "--batch-size", "63", "--grad-accum", "2", "--out", tmp_path / "r"]
    assert_one_line_error(run(argv), "--batch-size 63")


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """The user's own model package in the current directory, as the CLI finds it."""
    pkg = tmp_path / "mynets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text("def not_a_model(num_classes):\n    return [num_classes]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "mynets", raising=False)
    monkeypatch.delitem(sys.modules, "mynets.nets", raising=False)
    yield tmp_path
    for name in ("mynets.nets", "mynets"):
        sys.modules.pop(name, None)


@pytest.mark.parametrize(
    "spec,needle",
    [
        ("nosuchpkg.mod:build", "no module 'nosuchpkg'"),
        ("mynets.nets:missing", "module mynets.nets has no attribute 'missing'"),
        ("torchvision:resnet5", "torchvision has no classification model 'resnet5'"),
        ("vgg", "unknown model 'vgg'"),
    ],
)
def test_bad_specs_fail_before_the_data_is_read(user_dir, spec, needle):
    # the data dir does not exist: an error about the model shows the model was checked first
    args = [*SMALL, "--dataset", "cifar10", "--data-dir", user_dir / "none", "--no-download", "--model", spec]
    assert_one_line_error(run([*args, "--out", user_dir / "r"]), needle)


def test_factory_returning_something_else_is_one_line(user_dir):
    argv = [*SMALL, "--max-steps", "4", "--eval-every", "0", "--model", "mynets.nets:not_a_model"]
    assert_one_line_error(run([*argv, "--out", user_dir / "r"]), "returned a list, not a torch.nn.Module")
