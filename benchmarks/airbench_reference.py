"""airbench94's own code (the `airbench` 0.1.8 package) on the CIFAR-10 image folder that dist_cnn's fast
recipe (configs/fast94.toml) trains on: the accuracy that recipe should reach on this data.

airbench's published 94.01% is on the original lossless CIFAR-10; the shared data is a JPEG (q75)
re-encoding, so the recipe's target on it is what airbench itself reaches on it. The folder is decoded
once by dist_cnn's loader and saved in airbench's format (`cifar10/train.pt`, `cifar10/test.pt`: uint8
NHWC images, labels, classes) in --cache-dir, then `airbench.train94` trains with its own hyperparameters,
data loader, whitening, lookahead and TTA, and its own `evaluate` measures the test accuracy.

On CUDA the code runs unchanged (fp16 weights, as published). airbench is written for a GPU only, so on
the CPU four device shims make it run without touching the recipe: the network and images stay float32
(`.half().cuda()` becomes a no-op), the test loader it builds itself loads onto the CPU, and its CUDA
timing events use the wall clock. `--precision bf16` runs the network's forward under CPU bf16 autocast
(logits returned as float32, as dist_cnn's `--precision bf16` computes the loss).

    python benchmarks/airbench_reference.py [--data-dir DIR] [--precision fp32|bf16] [--epochs 9.9]
                                            [--seed 0] [--json out.json]
Needs the `bench` extra (airbench==0.1.8).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from unittest.mock import patch

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's benchmarks and dist_cnn

from benchmarks.common import CIFAR_DIR, ROOT, Stamp, parser  # noqa: E402


def write_airbench_data(data_dir: str, cache_dir: Path) -> Path:
    """The image folder as airbench's train.pt / test.pt under cache_dir/<folder key>/cifar10 (its
    loader's layout)."""
    from dist_cnn.config import DataConfig
    from dist_cnn.data.datasets import load_dataset

    key = hashlib.sha1(os.path.abspath(data_dir).encode()).hexdigest()[:12]  # one cache per folder
    target = cache_dir / key / "cifar10"
    if (target / "train.pt").exists() and (target / "test.pt").exists():
        return target
    ds = load_dataset(DataConfig(dataset="imagefolder", data_dir=data_dir))
    target.mkdir(parents=True, exist_ok=True)
    for split, x, y in (("train", ds.train_x, ds.train_y), ("test", ds.test_x, ds.test_y)):
        tmp = target / f"{split}.tmp"
        images = x.permute(0, 2, 3, 1).contiguous()  # airbench stores torchvision's NHWC uint8 arrays
        torch.save({"images": images, "labels": y.long(), "classes": list(ds.classes)}, tmp)
        os.replace(tmp, target / f"{split}.pt")
    return target


class WallEvent:
    """torch.cuda.Event's timing interface on the wall clock."""

    def __init__(self, enable_timing: bool = True):
        self.t = 0.0

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end: WallEvent) -> float:
        return 1e3 * (end.t - self.t)


def cpu_shims(utils):
    """What airbench's GPU-only code needs to run on the CPU (see the module docstring)."""

    class CpuCifarLoader(utils.CifarLoader):
        def __init__(self, path, train=True, batch_size=500, aug=None, drop_last=None, shuffle=None, altflip=False):
            super().__init__(path, train, batch_size, aug, drop_last, shuffle, altflip, gpu="cpu")
            self.images = self.images.float()

    stack = contextlib.ExitStack()
    stack.enter_context(patch.multiple(utils, CifarLoader=CpuCifarLoader))
    stack.enter_context(patch.multiple(torch.cuda, Event=WallEvent, synchronize=lambda *a, **k: None))
    return stack, CpuCifarLoader


def make_cpu_net(make_net, precision: str):
    def build():
        with patch.multiple(nn.Module, half=lambda m: m, cuda=lambda m, *a, **k: m):
            net = make_net()
        if precision == "bf16":
            forward = torch.autocast("cpu", dtype=torch.bfloat16)(net.forward)
            net.forward = lambda x: forward(x).float()
        return net

    return build


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, "CIFAR-10 as an image folder (train/, test/)", CIFAR_DIR)
    p.add_argument("--cache-dir", type=Path, default=ROOT / "data" / "airbench", help="where train.pt/test.pt go")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="bf16", help="on the CPU (CUDA: fp16 always)")
    p.add_argument("--epochs", type=float, default=9.9, help="airbench94's 9.9; fewer for a quick check")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    stamp = Stamp()
    try:
        import airbench
        from airbench import lib_airbench94, utils
    except ImportError:
        print("airbench_reference: the airbench package is missing: pip install 'airbench==0.1.8'", file=sys.stderr)
        return 2
    if not (Path(args.data_dir) / "train").is_dir():
        print(f"airbench_reference: {args.data_dir} has no train/ folder", file=sys.stderr)
        return 2

    data = write_airbench_data(args.data_dir, args.cache_dir.resolve())
    os.chdir(data.parent)  # airbench's train() opens its test set as ./cifar10/test.pt
    torch.manual_seed(args.seed)
    cuda = torch.cuda.is_available()
    shims, loader_cls = (contextlib.ExitStack(), utils.CifarLoader) if cuda else cpu_shims(utils)
    make_net = lib_airbench94.make_net94 if cuda else make_cpu_net(lib_airbench94.make_net94, args.precision)
    hyp = lib_airbench94.hyp
    with shims:
        train = loader_cls("cifar10", train=True, batch_size=hyp["opt"]["batch_size"], aug=hyp["aug"], altflip=True)
        test = loader_cls("cifar10", train=False, batch_size=2000)
        t0 = time.perf_counter()
        model = lib_airbench94.train94(train, epochs=args.epochs, make_net=make_net, verbose=False)
        seconds = time.perf_counter() - t0
        acc = {f"tta{level}": airbench.evaluate(model, test, tta_level=level) for level in (0, 2)}
    result = stamp.result(
        {
            "airbench": "0.1.8 train94",
            "device": "cuda (fp16)" if cuda else f"cpu ({args.precision})",
            "epochs": args.epochs,
            "seed": args.seed,
            "train_seconds": round(seconds, 1),
            "test_acc": acc["tta2"],
            "test_acc_no_tta": acc["tta0"],
        }
    )
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
