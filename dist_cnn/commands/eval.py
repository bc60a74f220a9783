"""`dist-cnn eval --checkpoint PATH`: the test metrics of a saved model, at any world size."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dist_cnn import config as config_mod
from dist_cnn.data.datasets import load_dataset
from dist_cnn.data.stream import StreamEval, load_index
from dist_cnn.distributed import process_group as D
from dist_cnn.errors import UserError
from dist_cnn.fileio import STDOUT, check_output, write_output
from dist_cnn.models.prepare import prepare_model
from dist_cnn.models.trust import add_trust_arguments, check_file_spec
from dist_cnn.observability.format import display_names, percent
from dist_cnn.train import checkpoint
from dist_cnn.train import precision as P
from dist_cnn.train.evaluate import evaluate, evaluate_batches


def _batch_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not 1 <= value <= 1 << 24:
        raise argparse.ArgumentTypeError(f"must be in [1, {1 << 24}], got {value}")
    return value


def eval_parser():
    p = config_mod.ArgumentParser(
        prog="dist-cnn eval",
        description="Evaluate a checkpoint on a test set "
        "(training's exact, distributed evaluation; torchrun works too).",
    )
    p.add_argument("--checkpoint", required=True, help="a step-N.pt/best.pt checkpoint or a model.pt export")
    add_trust_arguments(p)
    p.add_argument("--dataset", choices=config_mod.DATASETS, help="default: the checkpoint's dataset")
    p.add_argument("--data-dir", help="default: the checkpoint's data dir")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="autocast precision (default: fp32)",
    )
    p.add_argument("--batch-size", type=_batch_size, default=1000, help="evaluation batch per rank (default: 1000)")
    p.add_argument(
        "--weights",
        default="model",
        choices=("model", "ema"),
        help="the trained weights, or their EMA (runs with --model-ema) (default: model)",
    )
    p.add_argument(
        "--output",
        help="write the metrics here as JSON (a FIFO or device is written into, - is stdout) "
        "(default: eval-<checkpoint>.json beside it)",
    )
    return p


def main_eval(argv) -> int:
    args = eval_parser().parse_args(argv)
    if args.output:
        check_output(args.output, [args.checkpoint])
    state = checkpoint.load(Path(args.checkpoint))
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("config"), dict)
        or not isinstance(state.get("model"), dict)
    ):
        what = checkpoint.describe(state) if not isinstance(state, dict) else "no config/model in it"
        raise UserError(f"{args.checkpoint} is not a dist_cnn checkpoint or model.pt ({what})")
    if args.weights == "ema":
        if not state.get("ema"):
            raise UserError(f"{args.checkpoint} has no EMA weights (the run had no --model-ema)")
        # checkpoints keep the AveragedModel's state (module.* and its update count), model.pt the plain one
        state = dict(state, model={k.removeprefix("module."): v for k, v in state["ema"].items() if k != "n_averaged"})
    try:
        cfg = config_mod.from_dict(state["config"])
    except UserError as e:
        raise UserError(f"{args.checkpoint}: its config does not fit this version ({e})") from None
    check_file_spec(cfg.model.name, args.checkpoint, named=args.model, trust=args.trust_model_code)
    if args.dataset:
        cfg.data.dataset = args.dataset
    if args.data_dir:
        cfg.data.data_dir = args.data_dir
    with D.process_group(cfg.dist.backend, cfg.dist.timeout) as env:
        if state.get("loader") == "stream":  # trained on a streamed folder: evaluated the same way
            data = load_index(cfg.data, env)
            _check_classes(state, data, cfg)
            prepared = prepare_model(cfg, data, env.device, state)
            test = StreamEval(
                data.test,
                rank=env.rank,
                world=env.world_size,
                image_size=data.image_size,
                eval_crop_ratio=cfg.data.eval_crop_ratio,
                device=env.device,
                workers=cfg.data.workers,
                batch_size=args.batch_size,
                skip_bad=cfg.data.skip_bad_images,
                decode=cfg.data.decode,
            )
            try:
                res = evaluate_batches(
                    prepared.model,
                    test.batches(prepared.normalize),
                    len(data.test),
                    num_classes=data.num_classes,
                    env=env,
                    precision=P.resolve(args.precision, env.device),
                    tta=cfg.train.tta,
                )
            except UserError as e:  # training's hint names a flag that eval does not take
                raise UserError(str(e).replace(", or pass --skip-bad-images", "")) from None
        else:
            data = D.main_then_all(env, lambda: load_dataset(cfg.data))
            _check_classes(state, data, cfg)
            prepared = prepare_model(cfg, data, env.device, state)  # training's memory format: its arithmetic
            res = evaluate(
                prepared.model,
                data.test_x,
                data.test_y,
                num_classes=data.num_classes,
                normalize=prepared.normalize,
                env=env,
                precision=P.resolve(args.precision, env.device),
                batch_size=args.batch_size,
                tta=cfg.train.tta,
            )
        if env.is_main:
            _report(args, cfg, data, env, res)
    return 0


def _check_classes(state: dict, data, cfg) -> None:
    """The model's classes are the dataset's, by name and order: otherwise every number is wrong."""
    trained = state.get("classes")
    if trained is not None and list(trained) != list(data.classes):

        def show(names):
            return ", ".join(map(str, names[:6])) + (f", ... ({len(names)} classes)" if len(names) > 6 else "")

        raise UserError(
            f"the model was trained on classes [{show(list(trained))}] but {cfg.data.dataset} in "
            f"{cfg.data.data_dir} has [{show(list(data.classes))}]: evaluate it on its own dataset"
        )


def _report(args, cfg, data, env, res: dict) -> None:
    res = {
        "checkpoint": str(args.checkpoint),
        "weights": args.weights,
        "dataset": cfg.data.dataset,
        "model": cfg.model.name,
        "classes": data.classes,
        "world_size": env.world_size,
        **res,
    }
    console = sys.stderr if args.output == STDOUT else sys.stdout  # stdout carries the JSON then
    print(f"test accuracy {res['test_accuracy']:.4f} ({res['test_correct']}/{res['test_total']})", file=console)
    per_class = res["per_class_accuracy"]
    for name, acc in zip(display_names(data.classes, len(per_class)), per_class):
        print(f"  {name:<12} {percent(acc)}", file=console)
    ckpt = Path(args.checkpoint)
    out = args.output or str(ckpt.with_name(f"eval-{ckpt.stem}.json"))
    try:
        write_output(out, (json.dumps(res, indent=2) + "\n").encode())
    except OSError as e:
        print(f"warning: could not write {out}: {e.strerror or e}", file=sys.stderr)
