"""`dist-cnn predict --model-file RUN/model.pt PATH...`: top-k classes of image files.

Under torchrun every rank predicts a contiguous slice of the file list and rank 0 gathers the rows
and writes each file's row once, in input order. Unreadable files are reported one line each on
stderr and counted; the others are still predicted.
"""

from __future__ import annotations

import csv
import io
import json
import sys
import time

import torch
from torch.utils.data import DataLoader, Dataset

from dist_cnn import config as config_mod
from dist_cnn.data.loader import eval_shard
from dist_cnn.data.workers import ignore_stop_signals
from dist_cnn.distributed import process_group
from dist_cnn.errors import UserError
from dist_cnn.fileio import check_output, write_output
from dist_cnn.inference.predictor import InferenceModel, list_images, load_decoders, load_image, load_model, logits
from dist_cnn.models.trust import add_trust_arguments
from dist_cnn.train import precision

FORMATS = ("table", "json", "csv")


def predict_parser():
    p = config_mod.ArgumentParser(
        prog="dist-cnn predict",
        description="Predict the classes of image files with a trained model, using the run's own "
        "preprocessing (resize, normalization, test-time augmentation). Runs under torchrun "
        "too: the files are split across ranks and rank 0 writes every row.",
    )
    p.add_argument(
        "paths", nargs="+", metavar="PATH", help="image files, or folders searched recursively for image files"
    )
    p.add_argument("--model-file", required=True, help="a run's model.pt or a checkpoint (step-N.pt, best.pt)")
    add_trust_arguments(p)
    p.add_argument(
        "--top-k",
        type=int,
        default=5,
        metavar="K",
        help="classes per image, most probable first (default: 5; at most the number of classes)",
    )
    p.add_argument(
        "--batch-size", type=int, default=256, metavar="N", help="images per forward pass and rank (default: 256)"
    )
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="table",
        help="table: aligned columns; json: one "
        "JSON object per line; csv: a header, then one row per file (default: table)",
    )
    p.add_argument(
        "--output",
        metavar="FILE",
        help="write the rows to FILE instead of stdout: a regular file is replaced when done, a FIFO or "
        "device is written into, - is stdout; never one of the inputs",
    )
    p.add_argument(
        "--skip-bad-images",
        action="store_true",
        help="exit 0 even when some files cannot be read (each is still reported on stderr) (default: False)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        metavar="N",
        help="DataLoader processes decoding the images, per rank; 0 decodes in the main process (default: 0)",
    )
    p.add_argument(
        "--tta",
        type=int,
        choices=(0, 1, 2),
        help="test-time augmentation: 0 none, 1 mirror, 2 mirror + translations (default: the run's --tta)",
    )
    p.add_argument(
        "--precision",
        default="fp32",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="autocast precision of the forward pass (default: fp32)",
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        metavar="N",
        help="refuse an image whose header declares more pixels than this, before decoding; 0 = no limit "
        "(default: the run's --max-image-pixels, else PIL's 89478485)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="X",
        help="seconds a collective may wait under torchrun (default: 300.0)",
    )
    return p


def _check(args) -> None:
    for flag, value in (("--top-k", args.top_k), ("--batch-size", args.batch_size)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")
    if args.max_image_pixels is not None and args.max_image_pixels < 0:
        raise UserError(f"--max-image-pixels must be >= 0, got {args.max_image_pixels}")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0, got {args.workers}")
    if args.output:
        check_output(args.output, [args.model_file, *args.paths])


class _Files(Dataset):
    """(position, uint8 image or None, error or None): a bad file is a row, not an exception.
    Holds only what decoding needs (workers get a copy of it, not of the model)."""

    def __init__(self, files: list[str], start: int, im: InferenceModel, max_pixels: int | None):
        self.files, self.start, self.max_pixels = files, start, max_pixels
        self.im = InferenceModel(None, im.name, [], im.in_channels, im.image_size, [], [], im.config, im.loader)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        try:
            return self.start + i, load_image(self.files[i], self.im, self.max_pixels), None
        except UserError as e:  # the decoder's one line, which names the file: keep what follows the name
            text = str(e).replace(f" {self.files[i]}", "")
            return self.start + i, None, text


def _collate(items):
    good = [(i, x) for i, x, _ in items if x is not None]
    bad = [(i, err) for i, _, err in items if err is not None]
    batch = torch.stack([x for _, x in good]) if good else None
    return [i for i, _ in good], batch, bad


def _predict_shard(im, files, part: slice, args, env) -> tuple[list, list]:
    """This rank's rows [(position, [class index...], [probability...])] and errors [(position, text)]."""
    model = im.model.to(env.device)
    if im.channels_last:  # the run's memory format: the same arithmetic as its evaluation
        model = model.to(memory_format=torch.channels_last)
    normalize = im.normalizer(env.device)
    autocast_to = precision.resolve(args.precision, env.device)
    k = min(args.top_k, im.num_classes)
    loader = DataLoader(
        _Files(files[part], part.start, im, args.max_image_pixels),
        batch_size=args.batch_size,
        shuffle=False,
        num_workers=args.workers,
        collate_fn=_collate,
        worker_init_fn=ignore_stop_signals,  # Ctrl-C is the main process's: one line, exit 130
        pin_memory=env.device.type == "cuda",
    )
    rows, errors = [], []
    for positions, batch, bad in loader:
        errors += bad
        if batch is None:
            continue
        with precision.autocast(autocast_to, env.device):
            out = logits(im, model, batch.to(env.device, non_blocking=True), normalize, args.tta)
        probs = out.float().softmax(1)
        top = probs.topk(k, dim=1)
        rows += zip(positions, top.indices.cpu().tolist(), top.values.cpu().tolist())
    return rows, errors


def _gather(obj, env) -> list:
    if not env.initialized:
        return [obj]
    out = [None] * env.world_size if env.is_rank0 else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def _render(rows, files, classes, fmt: str) -> str:
    buf = io.StringIO()
    if fmt == "json":
        for pos, idx, prob in rows:
            preds = [{"class": classes[c], "index": c, "probability": p} for c, p in zip(idx, prob)]
            buf.write(json.dumps({"file": files[pos], "predictions": preds}) + "\n")
    elif fmt == "csv":
        k = len(rows[0][1]) if rows else 0
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["file"] + [f"{what}_{r}" for r in range(1, k + 1) for what in ("class", "probability")])
        for pos, idx, prob in rows:
            w.writerow([files[pos]] + [v for c, p in zip(idx, prob) for v in (classes[c], f"{p:.6g}")])
    else:
        table = [[files[pos]] + [f"{classes[c]} {100 * p:.1f}%" for c, p in zip(idx, prob)] for pos, idx, prob in rows]
        k = len(rows[0][1]) if rows else 0
        table.insert(0, ["file"] + [f"top-{r}" for r in range(1, k + 1)])
        widths = [max(len(r[j]) for r in table) for j in range(len(table[0]))]
        for r in table:
            buf.write("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() + "\n")
    return buf.getvalue()


def _write(text: str, output: str | None) -> None:
    if not output:
        sys.stdout.write(text)
        return
    try:
        write_output(output, text.encode())
    except OSError as e:
        raise UserError(f"--output {output}: cannot write it ({e.strerror or e})") from None


def _listed(args) -> list[str]:
    files = list_images(args.paths)
    if args.output:  # a folder given as input may hold the output file
        check_output(args.output, files)
    return files


def main_predict(argv) -> int:
    args = predict_parser().parse_args(argv)
    _check(args)
    with process_group.process_group("auto", args.timeout) as env:
        return _run(args, env)


def _run(args, env) -> int:
    files = process_group.rank0_only(env, lambda: _listed(args))
    im = process_group.rank0_then_all(
        env, lambda: load_model(args.model_file, model=args.model, trust_model_code=args.trust_model_code)
    )
    part = eval_shard(len(files), env.rank, env.world_size)
    load_decoders()  # the clock below measures predicting, not importing
    start = time.perf_counter()
    rows, errors = _predict_shard(im, files, part, args, env)
    gathered = _gather((rows, errors), env)
    code = 0
    if env.is_rank0:
        seconds = time.perf_counter() - start
        rows = sorted((r for rank_rows, _ in gathered for r in rank_rows), key=lambda r: r[0])
        errors = sorted((e for _, rank_errors in gathered for e in rank_errors), key=lambda e: e[0])
        what = "warning: skipped" if args.skip_bad_images else "error:"
        for pos, text in errors:
            print(f"{what} {files[pos]}: {text}", file=sys.stderr)
        _write(_render(rows, files, im.classes, args.format), args.output)
        print(
            f"predicted {len(rows)} images in {seconds:.2f} s ({len(rows) / max(seconds, 1e-9):.0f} images/s, "
            f"world size {env.world_size}, {env.device})",
            file=sys.stderr,
        )
        if errors and not args.skip_bad_images:
            print(
                f"error: {len(errors)} of {len(files)} files could not be read (--skip-bad-images to exit 0)",
                file=sys.stderr,
            )
            code = 1
    return process_group.broadcast_object(code, env)
