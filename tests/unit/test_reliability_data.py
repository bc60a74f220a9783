"""Normalization statistics from the whole training set; one image cache per image size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dist_cnn.config import DataConfig
from dist_cnn.data import datasets as D
from dist_cnn.data.loader import normalization_stats


def test_normalization_uses_the_whole_training_set_not_a_class_sorted_prefix():
    g = torch.Generator().manual_seed(0)
    # 30,000 images sorted by class: the first third dark, the rest bright (as an image folder lists them).
    dark = torch.randint(0, 60, (10000, 3, 8, 8), generator=g, dtype=torch.uint8)
    bright = torch.randint(150, 256, (20000, 3, 8, 8), generator=g, dtype=torch.uint8)
    x = torch.cat([dark, bright])
    mean, std = normalization_stats(x, "dataset")
    ref = x.double().div(255)
    assert np.allclose(mean, ref.mean(dim=(0, 2, 3)).tolist(), atol=1e-6)
    assert np.allclose(std, ref.std(dim=(0, 2, 3)).tolist(), atol=1e-6)


def test_normalization_of_a_constant_channel_does_not_divide_by_zero():
    mean, std = normalization_stats(torch.full((5, 1, 4, 4), 7, dtype=torch.uint8), "dataset")
    assert mean == pytest.approx([7 / 255]) and std[0] > 0


def make_folder(root: Path) -> None:
    for split in ("train", "test"):
        for c in ("a", "b"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((12, 12, 3), 40 * i + (c == "b") * 100, np.uint8)).save(d / f"{i}.png")


def test_switching_image_size_keeps_the_other_sizes_cache(tmp_path):
    make_folder(tmp_path)
    cache = tmp_path / ".dist_cnn_cache"
    for size in (8, 16):
        D.load_dataset(DataConfig(dataset="imagefolder", data_dir=str(tmp_path), image_size=size))
    assert len(list(cache.glob("*.pt"))) == 2
    names = {p.name for p in cache.glob("*.pt")}
    D.load_dataset(DataConfig(dataset="imagefolder", data_dir=str(tmp_path), image_size=8))  # a hit
    assert {p.name for p in cache.glob("*.pt")} == names
    (tmp_path / "train" / "a" / "2.png").write_bytes((tmp_path / "train" / "a" / "0.png").read_bytes())
    D.load_dataset(DataConfig(dataset="imagefolder", data_dir=str(tmp_path), image_size=8))
    assert len(list(cache.glob("*.pt"))) == 2  # the stale size-8 cache replaced, size 16 kept


def test_an_empty_test_set_is_refused_before_training(tmp_path):
    make_folder(tmp_path)
    for f in (tmp_path / "test").rglob("*.png"):
        f.unlink()
    with pytest.raises(D.UserError, match="holds no class folders with images|test set is empty"):
        D.load_dataset(DataConfig(dataset="imagefolder", data_dir=str(tmp_path), image_size=8))
