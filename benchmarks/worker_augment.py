"""The ImageNet recipe's per-image augmentation (TrivialAugmentWide + random erasing 0.1): the training
process's CPU time per step with it in the training process (as before) against in the DataLoader
workers (the stream pipeline's default now). Interleaved rounds on the same pipeline, medians.

The training process's CPU time is time.process_time() around each next(batch): the workers are other
processes and not counted; what is counted is what a GPU run's training process spends on feeding the
GPU instead of launching its kernels. Generated JPEGs (300-500 px) are cropped to --size.

    python benchmarks/worker_augment.py [--images 256] [--size 224] [--batch 32] [--workers 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dist_cnn.config import DataConfig
from dist_cnn.data.augment import ImageAugment
from dist_cnn.data.loader import Augment
from dist_cnn.data.open import open_source
from dist_cnn.distributed.process_group import DistEnv


def jpeg_folder(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("test", 4)):
        for i in range(count):
            d = root / split / f"c{i % 4}"
            d.mkdir(parents=True, exist_ok=True)
            h, w = int(rng.integers(300, 500)), int(rng.integers(300, 500))
            ys, xs = np.mgrid[0:h, 0:w]
            base = 128 + 60 * np.sin(xs[..., None] / rng.uniform(5, 40) + ys[..., None] / rng.uniform(5, 40))
            pix = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pix).save(d / f"{i:04d}.jpg", quality=85)
    return root


def epoch_cpu_ms(pipe, epoch: int, in_workers: bool) -> list[float]:
    """Training-process CPU ms of each step of one epoch (the first, which starts the workers, left out)."""
    pipe.in_workers = in_workers  # read by the sampler and epoch() at the start of each epoch
    per_step, it = [], pipe.epoch(epoch)
    while True:
        t = time.process_time()
        if next(it, None) is None:
            return per_step[1:]
        per_step.append((time.process_time() - t) * 1000)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = jpeg_folder(Path(tmp), a.images)
        cfg = DataConfig(
            dataset="imagefolder",
            data_dir=str(root),
            image_size=a.size,
            loader="stream",
            train_crop="random-resized",
            eval_resize="center-crop",
            workers=a.workers,
        )
        source, _ = open_source(cfg, DistEnv())
        pipe = source.train_batches(
            loader="stream",
            batch_per_rank=a.batch,
            rank=0,
            world=1,
            seed=0,
            aug=Augment(flip=True),
            normalize=lambda x: x.float(),
            device=torch.device("cpu"),
            workers=a.workers,
            image_aug=ImageAugment("ta_wide", 0.1, seed=0, fill=(0.485, 0.456, 0.406)),
        )
        ms = {"training process": [], "workers": []}
        for r in range(a.rounds):  # interleaved, the order alternating
            order = (False, True) if r % 2 == 0 else (True, False)
            for in_workers in order:
                ms["workers" if in_workers else "training process"] += epoch_cpu_ms(pipe, r, in_workers)
        print(
            f"{a.images} JPEGs 300-500 px -> {a.size} px, batch {a.batch}, {a.workers} workers, {a.rounds} rounds; "
            "training-process CPU ms per step (median, min-max):"
        )
        for where, values in ms.items():
            print(
                f"  per-image augmentation in the {where:16s}: {statistics.median(values):7.1f} "
                f"({min(values):.1f}-{max(values):.1f}, {len(values)} steps)"
            )


if __name__ == "__main__":
    main()
