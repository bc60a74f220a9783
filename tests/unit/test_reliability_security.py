"""A model spec read from a file never imports code unless the command line asks: eval, predict,
export, resume and the Python API's load_model. In-process."""

from __future__ import annotations

import contextlib
import io
import sys
import textwrap

import pytest
import torch

from dist_cnn import config
from dist_cnn.commands import main
from dist_cnn.errors import UserError
from dist_cnn.inference.predictor import load_model
from dist_cnn.models.registry import SeedNet
from dist_cnn.models.trust import check_file_spec, needs_trust

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")


def run(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, [ln for ln in err.getvalue().splitlines() if ln.strip()]


@pytest.fixture
def planted(tmp_path, monkeypatch):
    """A module in the current folder that leaves a mark when imported, and builds a SeedNet."""
    (tmp_path / "planted.py").write_text(
        textwrap.dedent("""
        import pathlib
        pathlib.Path("IMPORTED").write_text("yes")
        from dist_cnn.models.registry import SeedNet as Net
        """)
    )
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    sys.modules.pop("planted", None)


def model_file(path, spec: str):
    cfg = config.Config()
    cfg.model.name, cfg.data.dataset = spec, "synthetic"
    cfg.data.synthetic_train_size, cfg.data.synthetic_test_size = 64, 32
    torch.save(
        {
            "model": SeedNet(3, 10, 32).state_dict(),
            "model_name": spec,
            "classes": [f"pattern{i}" for i in range(10)],
            "in_channels": 3,
            "image_size": 32,
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
            "config": config.to_dict(cfg),
        },
        path,
    )
    return path


@pytest.mark.parametrize("spec", ["code:interact", "planted:Net", "os:system", "dist_cnn.cli:main"])
def test_a_file_naming_a_module_imports_nothing(planted, spec):
    path = model_file(planted / "model.pt", spec)
    with pytest.raises(UserError, match=f"asks to import module '{spec.split(':')[0]}'.*--model {spec}") as e:
        load_model(path)
    assert "\n" not in str(e.value) and "--trust-model-code" in str(e.value)
    assert not (planted / "IMPORTED").exists() and "planted" not in sys.modules


@pytest.mark.parametrize("command", ["eval", "predict", "export"])
def test_every_command_refuses_a_file_naming_a_module(planted, command):
    path = str(model_file(planted / "model.pt", "planted:Net"))
    argv = {
        "eval": ["eval", "--checkpoint", path],
        "predict": ["predict", "--model-file", path, str(planted / "model.pt")],
        "export": ["export", path, "--format", "safetensors"],
    }[command]
    code, lines = run(argv)
    assert code == 2 and len(lines) == 1 and "asks to import module 'planted'" in lines[0], lines
    assert not (planted / "IMPORTED").exists()


def test_the_same_spec_on_the_command_line_or_trust_allows_it(planted):
    path = model_file(planted / "model.pt", "planted:Net")
    assert load_model(path, model="planted:Net").name == "planted:Net"
    sys.modules.pop("planted", None)
    assert load_model(path, trust_model_code=True).num_classes == 10
    assert (planted / "IMPORTED").exists()


def test_another_spec_on_the_command_line_is_refused(planted):
    path = model_file(planted / "model.pt", "planted:Net")
    with pytest.raises(UserError, match=r"--model other:Net is not the model .* \(planted:Net\)"):
        load_model(path, model="other:Net")
    assert not (planted / "IMPORTED").exists()


@pytest.mark.parametrize(
    "spec", ["seed", "dist_cnn.models:SeedNet", "dist_cnn.models.registry:SeedNet", "dist_cnn.models.registry:seed"]
)
def test_built_ins_and_dist_cnns_own_model_classes_load(tmp_path, spec):
    assert not needs_trust(spec)
    assert load_model(model_file(tmp_path / "model.pt", spec)).num_classes == 10


@pytest.mark.parametrize("spec", ["torchvision:resnet18", "timm:resnet18"])
def test_library_specs_need_no_trust(spec):
    check_file_spec(spec, "model.pt")


@pytest.mark.parametrize("spec", ["dist_cnn.commands:main", "dist_cnn.models.prepare:prepare_model", "dist_cnn:fit"])
def test_dist_cnns_other_functions_are_not_built_ins(spec):
    assert needs_trust(spec)
