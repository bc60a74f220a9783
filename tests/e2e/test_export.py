"""`dist-cnn export`: ONNX / TorchScript / safetensors round trips with parity and metadata, for every
built-in model trained by the real trainer; failures are one line and replace nothing."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from dist_cnn import cli
from dist_cnn.data.loader import Normalize
from dist_cnn.inference.export import ExportFailed, export
from dist_cnn.inference.predictor import InferenceModel, load_model
from tests.support.common import SMALL, run_py, train

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
safetensors_torch = pytest.importorskip("safetensors.torch")
pytestmark = [
    pytest.mark.filterwarnings("ignore:Unable to enable fault handler"),
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated"),
]

# one optimizer step of the real trainer on 16 images: a genuine model.pt, fast even for resnet18
TINY = [*SMALL, "--synthetic-train-size", "32", "--synthetic-test-size", "16", "--batch-size", "16", "--max-steps", "1"]


def _export(capsys, *args) -> tuple[int, str, str]:
    code = cli.main(["export", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def _diff(stdout: str) -> float:
    return float(re.search(r"max abs diff (\S+)", stdout).group(1))


def _metadata_ok(meta: dict, run) -> None:
    stored = torch.load(run / "model.pt", weights_only=True)
    assert meta["classes"] == stored["classes"] and meta["model"] == stored["model_name"]
    assert meta["mean"] == pytest.approx(stored["mean"]) and meta["std"] == pytest.approx(stored["std"])
    assert meta["image_size"] == 32 and meta["in_channels"] == 3 and "input" in meta


@pytest.mark.slow
@pytest.mark.parametrize("model", ["seed", "resnet18", "airbench"])
def test_export_round_trips_with_parity(model, tmp_path, capsys):
    run = tmp_path / "run"
    train([*TINY, "--model", model, "--out", run], check=0)
    im = load_model(run / "model.pt")
    x = Normalize(im.mean, im.std, "cpu", False)(torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8))
    with torch.no_grad():
        ref = im.model(x)
    figures = {}

    # ONNX: ONNX Runtime on the CPU, a dynamic batch axis, metadata_props
    code, out, err = _export(capsys, run / "model.pt", "--format", "onnx", "--output", tmp_path / "m.onnx")
    assert code == 0, err
    figures["onnx"] = _diff(out)
    assert "16 test images of synthetic" in out and figures["onnx"] <= 1e-4
    proto = onnx.load(tmp_path / "m.onnx")
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    meta = {p.key: json.loads(p.value) for p in proto.metadata_props}
    _metadata_ok(meta, run)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {meta["input_name"]: x.numpy()})[0]
    assert np.abs(got - ref.numpy()).max() <= 1e-4

    # TorchScript: loads without dist_cnn's classes, extra file with the metadata
    code, out, err = _export(capsys, run / "model.pt", "--format", "torchscript", "--output", tmp_path / "m.pt")
    assert code == 0, err
    figures["torchscript"] = _diff(out)
    extra = {"dist_cnn.json": ""}
    module = torch.jit.load(str(tmp_path / "m.pt"), _extra_files=extra)
    _metadata_ok(json.loads(extra["dist_cnn.json"]), run)
    with torch.no_grad():
        assert (module(x) - ref).abs().max() <= 1e-4

    # safetensors: weights alone plus metadata; a fresh model loading them computes the same
    st = tmp_path / "m.safetensors"
    code, out, err = _export(capsys, run / "model.pt", "--format", "safetensors", "--output", st)
    assert code == 0, err
    figures["safetensors"] = _diff(out)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        _metadata_ok({k: json.loads(v) for k, v in f.metadata().items()}, run)
    weights = safetensors_torch.load_file(str(tmp_path / "m.safetensors"))
    assert weights.keys() == im.model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in im.model.state_dict().items())
    print(f"{model}: max abs diff {figures}")


def test_export_failures_are_one_line_and_replace_nothing(seed_run, tmp_path, capsys):
    run = seed_run
    target = tmp_path / "m.onnx"
    target.write_text("an earlier export")
    # a real parity failure: ONNX Runtime's float arithmetic is not bit-identical to PyTorch's
    code, out, err = _export(capsys, run / "model.pt", "--output", target, "--tolerance", "0")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "parity check failed" in err, err
    assert target.read_text() == "an earlier export" and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    # bad input: exit 2, one line, before any work
    for args, words in [
        (["--format", "tflite"], "--format"),
        (["--parity-images", "1"], "--parity-images"),
        (["--output", tmp_path / "no" / "m.onnx"], "--output"),
        (["--images", tmp_path / "none.jpg"], "no such file"),
    ]:
        code, out, err = _export(capsys, run / "model.pt", *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and words in err, (args, err)
    code, out, err = _export(capsys, tmp_path / "missing.pt")
    assert code == 2 and "not found" in err


class _DataDependent(torch.nn.Module):
    """Branches on the values of its input: torch.export (and so the ONNX exporter) cannot capture it."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * 32 * 32, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x.flatten(1))
        return -self.fc(x.flatten(1))


def test_unexportable_model_is_one_clear_line(tmp_path):
    im = InferenceModel(_DataDependent().eval(), "custom", ["a", "b", "c"], 3, 32, [0.5] * 3, [0.5] * 3)
    with pytest.raises(ExportFailed) as e:
        export(im, "onnx", tmp_path / "m.onnx", torch.randn(4, 3, 32, 32), 1e-4)
    message = str(e.value)
    assert message.startswith("cannot export custom to onnx:") and "\n" not in message and len(message) < 400
    assert list(tmp_path.iterdir()) == []


def test_export_cli_in_a_subprocess(seed_run, image_folder):
    """The console entry as a user runs it (default output beside the model, parity on the run's test
    images): the parity line on stdout, nothing on stderr."""
    p = run_py(["-m", "dist_cnn.cli", "export", seed_run / "model.pt", "--format", "safetensors"], check=0)
    assert (seed_run / "model.safetensors").is_file() and p.stderr == ""
    assert "16 test images of imagefolder" in p.stdout and "max abs diff 0 " in p.stdout
