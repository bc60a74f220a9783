"""`dist-cnn export RUN/model.pt --format onnx|torchscript|safetensors --output FILE`."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from dist_cnn import config as config_mod
from dist_cnn.config import DataConfig
from dist_cnn.data.loader import Normalize
from dist_cnn.data.open import open_source
from dist_cnn.data.source import upgrade_stored_config
from dist_cnn.distributed.launch import DistEnv
from dist_cnn.errors import UserError, one_line
from dist_cnn.fileio import STDOUT, check_output
from dist_cnn.inference.export import FORMATS, SUFFIX, ExportFailed, check_available, export
from dist_cnn.inference.predictor import InferenceModel, list_images, load_image, load_model
from dist_cnn.models.trust import add_trust_arguments


def export_parser():
    p = config_mod.ArgumentParser(
        prog="dist-cnn export",
        description="Export a trained model with its class names, normalization and image size as "
        "metadata, then check that the exported file computes the same logits as PyTorch.",
    )
    p.add_argument("model_file", metavar="MODEL_FILE", help="a run's model.pt or a checkpoint (step-N.pt, best.pt)")
    add_trust_arguments(p)
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="onnx",
        help="onnx (dynamic batch axis, checked "
        "with ONNX Runtime), torchscript (scripted, else traced) or safetensors (weights only) "
        "(default: onnx)",
    )
    p.add_argument(
        "--output",
        metavar="FILE",
        help="where to write it: a regular file is replaced once the parity check passes, a FIFO or "
        "device is written into, - is stdout; never one of the inputs "
        f"(default: beside MODEL_FILE, {', '.join(f'<name>{s}' for s in SUFFIX.values())})",
    )
    p.add_argument(
        "--images",
        nargs="+",
        metavar="PATH",
        help="image files or folders for the parity check "
        "(default: the run's test set when it is readable here, else random images)",
    )
    p.add_argument(
        "--parity-images", type=int, default=16, metavar="N", help="how many images the parity check runs (default: 16)"
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        metavar="X",
        help="largest allowed absolute difference of a logit between the export and PyTorch (default: 0.0001)",
    )
    return p


def _test_images(im: InferenceModel, n: int) -> tuple[torch.Tensor, str]:
    """uint8 [n, C, S, S] from the run's test set as its evaluation prepared it, else random pixels;
    and where they came from."""
    stored = upgrade_stored_config(dict(im.config.get("data", {}) or {}), im.loader)
    known = {k: v for k, v in stored.items() if k in DataConfig.__dataclass_fields__}
    try:
        cfg = DataConfig(**{**known, "download": False, "workers": 0, "train_crop": "none"})
        if im.loader == "stream":  # read as the run read it (a folder too large for memory)
            cfg.loader = "stream"
        data, _ = open_source(cfg, DistEnv(), measure=False)
        batches = data.eval_batches(
            rank=0, world=1, normalize=lambda x: x, device=torch.device("cpu"), batch_size=n, workers=0
        )
        x, _ = next(iter(batches), (None, None))
        if x is not None and tuple(x.shape[1:]) == (im.in_channels, im.image_size, im.image_size):
            return x[:n], f"{min(n, len(x))} test images of {data.name}"
    except (UserError, OSError, TypeError):
        pass
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, im.in_channels, im.image_size, im.image_size), generator=g, dtype=torch.uint8)
    return x, f"{n} random images (the run's test set is not readable here; --images to use real ones)"


def _given_images(im: InferenceModel, paths, n: int) -> tuple[torch.Tensor, str]:
    files = list_images(paths)[:n]
    try:
        return torch.stack([load_image(f, im) for f in files]), f"{len(files)} given images"
    except UserError as e:
        raise UserError(f"--images: {e}") from None


def main_export(argv) -> int:
    args = export_parser().parse_args(argv)
    if args.parity_images < 3:
        raise UserError(f"--parity-images must be at least 3, got {args.parity_images}")
    if not args.tolerance >= 0:
        raise UserError(f"--tolerance must be >= 0, got {args.tolerance}")
    check_available(args.format)
    src = Path(args.model_file)
    output = args.output or str(src.with_name(src.stem + SUFFIX[args.format]))
    check_output(output, [src, *(args.images or [])])
    im = load_model(src, model=args.model, trust_model_code=args.trust_model_code)
    pixels, source = (
        _given_images(im, args.images, args.parity_images) if args.images else _test_images(im, args.parity_images)
    )
    x = Normalize(im.mean, im.std, "cpu", channels_last=False)(pixels)
    try:
        res = export(im, args.format, output, x, args.tolerance)
    except ExportFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: cannot write {output}: {e.strerror or one_line(e)}", file=sys.stderr)
        return 1
    size = res["bytes"] / 2**20
    console = sys.stderr if output == STDOUT else sys.stdout  # stdout carries the file then
    print(
        f"exported {im.name} ({im.num_classes} classes, {im.in_channels}x{im.image_size}x{im.image_size}) "
        f"to {output} ({args.format}, {res['how']}, {size:.1f} MiB)",
        file=console,
    )
    print(
        f"parity on {source}, batches of {len(x)} and 3: max abs diff {res['max_abs_diff']:.3g} "
        f"(tolerance {args.tolerance:g})",
        file=console,
    )
    return 0
