"""Streaming image folders (`--loader stream`): the figures, side by side, from one run.

1. throughput  training-pipeline images/s at 1 and 2 workers on generated ImageNet-like JPEGs (300-500 px,
               cropped to 224): dist_cnn's stream pipeline against what one writes by hand (torchvision
               ImageFolder + transforms.v2 RandomResizedCrop/flip/ToDtype/Normalize + DataLoader +
               DistributedSampler, the same workers and batch).
2. rss         peak RSS of a training process (train.py, 1 rank) on folders of 2,500 / 10,000 / 40,000
               small JPEGs: the stream pipeline (flat) beside the in-memory one (grows with the data).
3. resnet50    torchvision ResNet-50 at 224 px, 2 ranks on the CPU through the stream pipeline: images/s
               and data_wait_frac (needs `--model torchvision:resnet50`).
4. cifar       CIFAR-10 (an image folder of 32 px JPEGs) with the default recipe, 2 epochs: the device
               pipeline against `--loader stream`. The recipe is the loader's no longer: both feed the
               model the same uint8 batches and the same normalization; what may still differ is the
               precision `auto` picks by timing. A second pair pins it (--normalize half --precision
               bf16).

The generated folders are made once and cached (--cache). Figures taken on a busy machine vary; the
ratios are what to read.

    python benchmarks/data_pipeline.py [--images 10000] [--only throughput,rss,resnet50,cifar]
                                       [--data-dir CIFAR_DIR] [--cache DIR] [--json out.json]
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's benchmarks and dist_cnn

from benchmarks.common import CIFAR_DIR, Stamp, child_env, parser, pipeline_rate, read_run, steady, train_command  # noqa: E402
from benchmarks.images import MEAN, STD, folder_stats, make_folder, stream_pipeline  # noqa: E402
from dist_cnn.config import DataConfig  # noqa: E402

# ----------------------------------------------------------------------------- 1. throughput


def ours(root: Path, workers: int, batch: int, steps: int) -> dict:
    cfg = DataConfig(
        dataset="imagefolder",
        data_dir=str(root),
        image_size=224,
        loader="stream",
        train_crop="random-resized",
        eval_resize="center-crop",
        normalize="half",  # no statistics sample: this measures the training pipeline
        workers=workers,
    )
    pipe = stream_pipeline(cfg, batch)
    res = pipeline_rate(pipe.epoch(0), pipe.loader, 2, steps, batch)
    del pipe
    return res


def reference(root: Path, workers: int, batch: int, steps: int) -> dict:
    from torch.utils.data import DataLoader, DistributedSampler
    from torchvision import datasets
    from torchvision.transforms import v2

    tf = v2.Compose(
        [
            v2.RandomResizedCrop(224, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )
    ds = datasets.ImageFolder(str(root / "train"), transform=tf)
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=0)
    loader = DataLoader(
        ds, batch_size=batch, sampler=sampler, num_workers=workers, persistent_workers=True, drop_last=True
    )
    res = pipeline_rate(loader, loader, 2, steps, batch)
    del loader
    return res


def throughput(root: Path, batch: int, steps: int) -> list[dict]:
    rows = []
    for workers in (1, 2):
        ref = reference(root, workers, batch, steps)
        gc.collect()  # the loaders' workers stop before the next ones start
        mine = ours(root, workers, batch, steps)
        gc.collect()
        rows.append(
            {
                "workers": workers,
                "reference": ref,
                "stream": mine,
                "ratio_wall": mine["images_per_sec"] / ref["images_per_sec"],
                "ratio_cpu": ref["cpu_ms_per_image"] / mine["cpu_ms_per_image"],
            }
        )
    return rows


# ----------------------------------------------------------------------------- runs of train.py


def train(args: list, nproc: int = 1, timeout: float = 3600) -> tuple[dict, list[dict]]:
    out = Path(tempfile.mkdtemp(prefix="data-bench-")) / "run"
    p = subprocess.run(
        train_command(args, out, nproc), env=child_env(), capture_output=True, text=True, timeout=timeout
    )
    if p.returncode != 0:
        lines = (p.stderr + p.stdout).splitlines()
        raise RuntimeError(next((ln for ln in lines if "error:" in ln), lines[-1] if lines else "failed"))
    return read_run(out)


def peak_rss(root: Path, loader: str) -> float:
    args = "--image-size 64 --batch-size 64 --max-steps 30 --log-every 5 --eval-every 0 --precision fp32 --workers 1"
    _, rows = train(["--dataset", "imagefolder", "--data-dir", root, "--loader", loader, *args.split()])
    return max(r["memory_mb"] for r in rows if r["event"] == "train")


def rss(cache: Path, counts: list[int]) -> list[dict]:
    rows = []
    for n in counts:
        root = make_folder(cache / f"small-{n}", n, 500, (56, 72), seed=n)
        rows.append({"images": n, "stream_mb": peak_rss(root, "stream"), "device_mb": peak_rss(root, "device")})
    return rows


def resnet50(root: Path, steps: int) -> dict:
    recipe = "--flip --train-crop random-resized --eval-resize center-crop --precision fp32 --eval-every 0"
    args = ["--dataset", "imagefolder", "--data-dir", root, "--loader", "stream", "--model", "torchvision:resnet50"]
    sizes = ["--image-size", 224, "--batch-size", 16, "--max-steps", steps, "--log-every", max(1, steps // 4)]
    summary, rows = train([*args, *sizes, *recipe.split()], nproc=2)
    train_rows = steady([r for r in rows if r["event"] == "train"])
    return {
        "steps": summary["steps"],
        "images_per_sec": sum(r["images_per_sec"] for r in train_rows) / len(train_rows),
        "data_wait_frac": sum(r["data_wait_frac"] for r in train_rows) / len(train_rows),
    }


def cifar(data_dir: str) -> dict:
    """The default recipe through both pipelines; then again with the normalization and the precision
    pinned (--normalize half --precision bf16), the two things that may differ between them."""
    base = ["--dataset", "imagefolder", "--data-dir", data_dir]
    stream = ["--loader", "stream"]
    pinned = ["--normalize", "half", "--precision", "bf16"]
    runs = {
        "device": [*base, "--loader", "device"],
        "stream": [*base, *stream],
        "device, pinned": [*base, "--loader", "device", *pinned],
        "stream, pinned": [*base, *stream, *pinned],
    }
    keys = ("test_accuracy", "train_images_per_sec", "train_seconds", "loader", "precision")
    return {name: {k: v for k, v in train(args)[0].items() if k in keys} for name, args in runs.items()}


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, "CIFAR-10 as an image folder (figure 4)", CIFAR_DIR, data_aliases=("--cifar-dir",))
    p.add_argument("--images", type=int, default=10000, help="training JPEGs of the 300-500 px folder")
    p.add_argument("--steps", type=int, default=20, help="timed batches of 64 per throughput figure")
    p.add_argument("--rss-counts", default="2500,10000,40000", help="folder sizes for the RSS figure")
    p.add_argument("--resnet-steps", type=int, default=200, help="ResNet-50 steps (batch 16, 2 ranks)")
    p.add_argument(
        "--cache",
        default=os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "dist_cnn", "bench"),
        help="where generated folders are kept",
    )
    p.add_argument("--only", default="throughput,rss,resnet50,cifar", help="comma-separated figures to take")
    args = p.parse_args(argv)
    stamp = Stamp()
    only, cache, res = set(args.only.split(",")), Path(args.cache), {}
    big = None
    if only & {"throughput", "resnet50"}:
        big = make_folder(cache / f"jpeg-{args.images}", args.images, max(100, args.images // 20), (300, 500))
        print(f"generated folder: {folder_stats(big)}")
    if "throughput" in only:
        res["throughput"] = throughput(big, 64, args.steps)
    if "rss" in only:
        res["rss"] = rss(cache, [int(n) for n in args.rss_counts.split(",")])
    if "resnet50" in only:
        try:
            res["resnet50"] = resnet50(big, args.resnet_steps)
        except RuntimeError as e:
            res["resnet50"] = {"skipped": str(e)}
    if "cifar" in only:
        res["cifar"] = cifar(args.data_dir)
    report(res)
    stamp.write(args.json, res)
    return 0


def report(res: dict) -> None:
    if "throughput" in res:
        print(
            "\n1. training pipeline, 224 px, batch 64     hand-written     stream   ratio   "
            "(CPU ms per image: training process + workers)"
        )
        for r in res["throughput"]:
            ref, mine = r["reference"], r["stream"]
            print(
                f"   {r['workers']} worker(s), images/s {'':20} {ref['images_per_sec']:8.0f} "
                f"{mine['images_per_sec']:10.0f} {r['ratio_wall']:6.2f}x"
            )
            print(
                f"   {r['workers']} worker(s), CPU ms/image {'':16} {ref['cpu_ms_per_image']:8.2f} "
                f"{mine['cpu_ms_per_image']:10.2f} {r['ratio_cpu']:6.2f}x"
            )
        ok = all(min(r["ratio_wall"], r["ratio_cpu"]) >= 1.0 for r in res["throughput"])
        print(
            f"   target >= 1.0x: {'PASS' if ok else 'FAIL'} (wall-clock figures on a busy machine are noisy; "
            f"the CPU time per image is not)"
        )
    if "rss" in res:
        rows = res["rss"]
        print(f"\n2. peak RSS of the training process {'':16} {'stream':>8} {'in-memory':>10}")
        for r in rows:
            print(f"   {r['images']:>6} images {'':34} {r['stream_mb']:6.0f} MB {r['device_mb']:7.0f} MB")
        growth = rows[-1]["stream_mb"] / rows[0]["stream_mb"] - 1
        print(
            f"   stream growth {rows[0]['images']} -> {rows[-1]['images']}: {growth:+.1%} "
            f"(target < 10%: {'PASS' if growth < 0.10 else 'FAIL'}); in-memory: "
            f"{rows[-1]['device_mb'] / rows[0]['device_mb'] - 1:+.1%}"
        )
    if "resnet50" in res:
        r = res["resnet50"]
        if "skipped" in r:
            print(f"\n3. ResNet-50, 224 px, 2 ranks (CPU): skipped ({r['skipped']})")
        else:
            print(
                f"\n3. ResNet-50, 224 px, 2 ranks (CPU), {r['steps']} steps: {r['images_per_sec']:.1f} images/s, "
                f"data_wait_frac {r['data_wait_frac']:.3f}"
            )
    if "cifar" in res:
        c = res["cifar"]
        print(f"\n4. CIFAR-10, default recipe, 2 epochs {'':13} {'accuracy':>8} {'img/s':>8} precision")
        for name, r in c.items():
            print(f"   {name:48} {r['test_accuracy']:8.2%} {r['train_images_per_sec']:8.0f} {r['precision']}")
        gap = abs(c["stream"]["test_accuracy"] - c["device"]["test_accuracy"])
        pinned = abs(c["stream, pinned"]["test_accuracy"] - c["device, pinned"]["test_accuracy"])
        print(
            f"   gap {gap * 100:.2f} points (target within 1: {'PASS' if gap <= 0.01 else 'FAIL'}); with the "
            f"normalization and precision pinned: {pinned * 100:.2f} points. The device path's statistics come "
            f"from the first 10,000 training images (CIFAR's first two classes), the stream path's from 2,000 "
            f"drawn at random."
        )


if __name__ == "__main__":
    sys.exit(main())
