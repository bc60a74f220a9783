"""The ImageNet recipe's per-image augmentation (TrivialAugmentWide + random erasing 0.1): the training
process's CPU time per step with it in the training process (as before) against in the DataLoader
workers (the stream pipeline's default now). Interleaved rounds on the same pipeline, medians.

The training process's CPU time is time.process_time() around each next(batch): the workers are other
processes and not counted; what is counted is what a GPU run's training process spends on feeding the
GPU instead of launching its kernels. Generated JPEGs (300-500 px, made once in --data-dir) are cropped
to --size.

    python benchmarks/worker_augment.py [--images 256] [--size 224] [--batch 32] [--workers 2] [--rounds 5]
                                     [--data-dir DIR] [--json PATH]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's benchmarks and dist_cnn

from benchmarks.common import Stamp, parser  # noqa: E402
from benchmarks.images import cache_dir, make_folder, stream_pipeline  # noqa: E402
from dist_cnn.config import DataConfig  # noqa: E402
from dist_cnn.data.augment import ImageAugment  # noqa: E402


def epoch_cpu_ms(pipe, epoch: int, in_workers: bool) -> list[float]:
    """Training-process CPU ms of each step of one epoch (the first, which starts the workers, left out)."""
    pipe.in_workers = in_workers  # read by the sampler and epoch() at the start of each epoch
    per_step, it = [], pipe.epoch(epoch)
    while True:
        t = time.process_time()
        if next(it, None) is None:
            return per_step[1:]
        per_step.append((time.process_time() - t) * 1000)


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, "where the generated JPEG folder is kept (made once)")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    stamp = Stamp()
    torch.set_num_threads(1)
    root = make_folder(cache_dir(a.data_dir) / f"augment-{a.images}", a.images, 4, (300, 500), classes=4)
    cfg = DataConfig(
        dataset="imagefolder",
        data_dir=str(root),
        image_size=a.size,
        loader="stream",
        train_crop="random-resized",
        eval_resize="center-crop",
        workers=a.workers,
    )
    image_aug = ImageAugment("ta_wide", 0.1, seed=0, fill=(0.485, 0.456, 0.406))
    pipe = stream_pipeline(cfg, a.batch, normalize=lambda x: x.float(), image_aug=image_aug)
    ms = {"training process": [], "workers": []}
    for r in range(a.rounds):  # interleaved, the order alternating
        order = (False, True) if r % 2 == 0 else (True, False)
        for in_workers in order:
            ms["workers" if in_workers else "training process"] += epoch_cpu_ms(pipe, r, in_workers)
    print(
        f"{a.images} JPEGs 300-500 px -> {a.size} px, batch {a.batch}, {a.workers} workers, {a.rounds} rounds; "
        "training-process CPU ms per step (median, min-max):"
    )
    res = {"images": a.images, "size": a.size, "batch": a.batch, "workers": a.workers, "cpu_ms_per_step": {}}
    for where, values in ms.items():
        res["cpu_ms_per_step"][where] = {"median": statistics.median(values), "all": values}
        print(
            f"  per-image augmentation in the {where:16s}: {statistics.median(values):7.1f} "
            f"({min(values):.1f}-{max(values):.1f}, {len(values)} steps)"
        )
    stamp.write(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
