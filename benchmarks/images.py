"""Generated JPEG folders (made once, kept in a cache folder) and the stream pipeline the data benchmarks
time on them (data_pipeline.py, shards_pipeline.py, worker_augment.py)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # any fixed values: every pipeline compared uses these
CPU = torch.device("cpu")


def cache_dir(given: str | None, default: str | Path | None = None) -> Path:
    """Where generated folders are kept: the one given (--data-dir), else `default`, else a folder under
    the system's temporary directory that later runs find again."""
    return Path(given or default or os.path.join(tempfile.gettempdir(), "dist_cnn_bench"))


def make_folder(
    dest: Path, n_train: int, n_test: int, sizes: tuple[int, int], classes: int = 10, seed: int = 0
) -> Path:
    """Real JPEGs of smooth random colour fields plus grain (files of ImageNet-like size), made once."""
    stamp = dest / ".complete"
    if stamp.is_file():
        return dest
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            c = i % classes
            w, h = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
            base = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
            pix = np.asarray(base, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
            d = dest / split / f"class{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pix.clip(0, 255).astype(np.uint8)).save(d / f"{i:06d}.jpg", quality=90)
    stamp.write_text(f"{n_train} {n_test} {sizes}\n")
    return dest


def folder_stats(root: Path) -> str:
    files = list((root / "train").rglob("*.jpg"))
    mb = sum(f.stat().st_size for f in files) / 2**20
    return f"{len(files)} train JPEGs, {mb:.0f} MB, {mb * 1024 / max(len(files), 1):.0f} KB each"


def stream_pipeline(cfg, batch: int, normalize=None, image_aug=None, measure: bool = True):
    """dist_cnn's training pipeline for cfg (a DataConfig) on one rank of the CPU: flips, cfg's crop,
    cfg.workers DataLoader workers; normalized with MEAN/STD unless another `normalize` is given."""
    from dist_cnn.data.loader import Augment, Normalize
    from dist_cnn.data.open import open_source
    from dist_cnn.distributed.process_group import DistEnv

    source, _ = open_source(cfg, DistEnv(), measure=measure)
    return source.train_batches(
        loader="stream",
        batch_per_rank=batch,
        rank=0,
        world=1,
        seed=0,
        aug=Augment(flip=True),
        normalize=normalize or Normalize(MEAN, STD, CPU, channels_last=False),
        device=CPU,
        workers=cfg.workers,
        image_aug=image_aug,
    )
