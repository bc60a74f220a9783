"""A tiny image folder, byte-identical on every machine: 4x4 PNGs (lossless) of 4 classes, each class
with its own brightness. Small enough that a whole training checkpoint of the seed model fits a test
fixture (tests/fixtures/)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("a", "b", "c", "d")


def write_tiny_folder(root: Path, train_per_class: int = 16, test_per_class: int = 4, size: int = 4) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for k, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = (rng.random((size, size, 3)) * 60 + 50 * k).astype(np.uint8)
                Image.fromarray(pixels).save(d / f"{i:03d}.png")
    return root


if __name__ == "__main__":
    import sys

    write_tiny_folder(Path(sys.argv[1]))
