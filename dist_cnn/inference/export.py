"""Export a trained model to ONNX, TorchScript or safetensors, with its metadata and a parity check.

Every format carries what a consumer needs besides the weights (class names, mean/std, image size,
model name, how to preprocess) as JSON strings: ONNX `metadata_props`, a TorchScript extra file
`dist_cnn.json`, safetensors' header metadata. The exported model is the plain forward pass
(normalized float32 images in, logits out; no test-time augmentation), with a dynamic batch axis.

The file is built in memory, checked, and only then written (fileio.write_output: a regular file is
replaced atomically, a FIFO or device written into): its outputs on a batch of test images (at two
batch sizes) must equal PyTorch's within the tolerance (ONNX Runtime on the CPU for ONNX, a fresh
model loading the weights for safetensors), else nothing is written. Building in memory also keeps
the exporters' own file writers (C++, Rust) away from the disk: a full disk is a Python OSError.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import re
import warnings
from pathlib import Path

import torch

from dist_cnn import __version__
from dist_cnn.errors import UserError
from dist_cnn.fileio import write_output
from dist_cnn.inference.predictor import InferenceModel
from dist_cnn.models.registry import build_model

FORMATS = ("onnx", "torchscript", "safetensors")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "safetensors": ".safetensors"}
NEEDS = {"onnx": ("onnx", "onnxscript", "onnxruntime"), "torchscript": (), "safetensors": ("safetensors",)}
INPUT_NAME, OUTPUT_NAME = "images", "logits"
METADATA_FILE = "dist_cnn.json"  # the TorchScript extra file


class ExportFailed(Exception):
    """The model could not be exported, or the exported file does not match PyTorch: exit code 1."""


def check_available(fmt: str) -> None:
    """Before any work: the optional packages this format needs (the `export` extra)."""
    missing = [m for m in NEEDS[fmt] if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"--format {fmt} needs {', '.join(missing)}: pip install 'dist_cnn[export]'")


def metadata(im: InferenceModel, fmt: str) -> dict[str, str]:
    """Flat string -> JSON-string metadata (the common denominator of the three formats)."""
    meta = {
        **im.metadata(),
        "format": fmt,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "exported_by": f"dist_cnn {__version__}",
    }
    return {k: json.dumps(v) for k, v in meta.items()}


def _summary(e: BaseException) -> str:
    """torch's exporter errors run to pages; the exception summary line says what went wrong."""
    text = str(e)
    m = re.search(r"<class '(?:[\w.]+\.)?(\w+)'>: ([^\n]+)", text)
    if m:
        return f"{m.group(1)}: {m.group(2).strip()}"[:300]
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first}"[:300] if first else type(e).__name__


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and pages of diagnostics; failures are reported in one line."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        yield


# ----------------------------------------------------------------------------- writers


def _write_onnx(im: InferenceModel, example: torch.Tensor) -> bytes:
    import onnx

    batch = torch.export.Dim("batch")
    with _quiet():
        program = torch.onnx.export(
            im.model,
            (example,),
            None,
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
        )
    proto = program.model_proto
    for key, value in metadata(im, "onnx").items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = f"dist_cnn {im.name}: {im.metadata()['input']} -> {im.metadata()['output']}"
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def _write_torchscript(im: InferenceModel, example: torch.Tensor) -> tuple[bytes, str]:
    """Scripted where the model scripts (keeps any control flow), else traced. Returns the file and which."""
    with _quiet():
        try:
            module, how = torch.jit.script(im.model), "scripted"
        except Exception:
            module, how = torch.jit.trace(im.model, example), "traced"
        extra = {METADATA_FILE: json.dumps({k: json.loads(v) for k, v in metadata(im, "torchscript").items()})}
        buf = io.BytesIO()
        torch.jit.save(module, buf, _extra_files=extra)
    return buf.getvalue(), how


def _write_safetensors(im: InferenceModel) -> bytes:
    from safetensors.torch import save

    # detached contiguous copies: safetensors refuses views and shared storage
    weights = {k: v.detach().contiguous().clone() for k, v in im.model.state_dict().items()}
    return save(weights, metadata=metadata(im, "safetensors"))


# ----------------------------------------------------------------------------- parity


def _run_onnx(blob: bytes, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _runner(im: InferenceModel, fmt: str, blob: bytes):
    """A function: normalized batch -> logits, from the exported file alone (plus the registry for
    safetensors, which holds weights only)."""
    if fmt == "onnx":
        return lambda x: _run_onnx(blob, x)
    if fmt == "torchscript":
        with _quiet():
            module = torch.jit.load(io.BytesIO(blob), map_location="cpu")
        return module
    from safetensors.torch import load

    fresh = build_model(im.name, im.in_channels, im.num_classes, im.image_size)
    fresh.load_state_dict(load(blob))
    return fresh.eval()


@torch.no_grad()
def parity(im: InferenceModel, fmt: str, blob: bytes, x: torch.Tensor) -> float:
    """Max |exported - PyTorch| over the batch x and its first 3 images (a second batch size)."""
    run = _runner(im, fmt, blob)
    diff = 0.0
    for batch in (x, x[:3]):
        ref = im.model(batch).float()
        out = run(batch).float()
        if out.shape != ref.shape:
            raise ExportFailed(
                f"parity check failed: the exported {fmt} model gives {tuple(out.shape)} "
                f"for a batch of {len(batch)}, PyTorch {tuple(ref.shape)}"
            )
        diff = max(diff, (out - ref).abs().max().item())
    return diff


# ----------------------------------------------------------------------------- entry


def export(im: InferenceModel, fmt: str, output: str, x: torch.Tensor, tolerance: float) -> dict:
    """Write `output` in format fmt from model im; x: a normalized float32 batch of test images.
    Returns {"max_abs_diff", "how", "bytes"}; raises ExportFailed (nothing written) on failure, OSError
    when the output cannot be written."""
    im.model.eval().to(memory_format=torch.contiguous_format)
    how = "weights"
    try:
        if fmt == "onnx":
            blob = _write_onnx(im, x[:2])
            how = "torch.onnx (dynamo), dynamic batch axis"
        elif fmt == "torchscript":
            blob, how = _write_torchscript(im, x[:2])
        else:
            blob = _write_safetensors(im)
    except ExportFailed:
        raise
    except Exception as e:
        raise ExportFailed(f"cannot export {im.name} to {fmt}: {_summary(e)}") from None
    diff = parity(im, fmt, blob, x)
    if not diff <= tolerance:  # NaN fails too
        raise ExportFailed(
            f"parity check failed: {fmt} outputs differ from PyTorch's by up to {diff:.3g} "
            f"(tolerance {tolerance:g}); {output} was not written"
        )
    write_output(str(output), blob)
    return {"max_abs_diff": diff, "how": how, "bytes": len(blob)}


def read_metadata(path: str | Path, fmt: str) -> dict:
    """The metadata an export stored, decoded from JSON (what a consumer reads)."""
    path = str(path)
    if fmt == "onnx":
        import onnx

        props = onnx.load(path, load_external_data=False).metadata_props
        return {p.key: json.loads(p.value) for p in props}
    if fmt == "torchscript":
        extra = {METADATA_FILE: ""}
        with _quiet():
            torch.jit.load(path, map_location="cpu", _extra_files=extra)
        return json.loads(extra[METADATA_FILE])
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
