"""Shared fixtures of the predict / export tests: a folder of real image files and a model trained on it."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tests.support.common import SMALL, train

CLASSES = ("circles", "squares", "stripes")
TRAIN_PER_CLASS, TEST_PER_CLASS = 48, 10


def _pattern(label: int, g: torch.Generator, size: int = 32) -> torch.Tensor:
    """A class template (fixed), a random brightness and noise: learnable within a few steps."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    c = size / 2
    shape = [
        ((yy - c) ** 2 + (xx - c) ** 2 < (size / 3) ** 2),
        (abs(yy - c) < size / 4) & (abs(xx - c) < size / 4),
        (xx // 4) % 2 == 0,
    ][label].float()
    colour = torch.tensor([[200, 60, 60], [60, 200, 60], [60, 60, 200]][label], dtype=torch.float32).view(3, 1, 1)
    img = 40 + shape * colour * (0.6 + 0.4 * torch.rand(1, generator=g)) + 25 * torch.randn(3, size, size, generator=g)
    return img.clamp(0, 255).to(torch.uint8)


def _pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(x.permute(1, 2, 0).numpy())


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    """DIR/{train,test}/<class>/*.jpg, real JPEG files. The test split also holds the odd ones a user
    has: grayscale and CMYK JPEGs, an RGBA and a palette PNG, a non-square picture. DIR/bad.jpg is
    a truncated JPEG (outside the dataset, which must decode)."""
    root = tmp_path_factory.mktemp("images")
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for label, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                _pil(_pattern(label, g)).save(d / f"{i:03d}.jpg", quality=92)
    test = root / "test"
    _pil(_pattern(0, g)).convert("L").save(test / "circles" / "gray.jpg", quality=92)
    _pil(_pattern(1, g)).convert("CMYK").save(test / "squares" / "cmyk.jpg", quality=92)
    rgba = _pil(_pattern(2, g)).convert("RGBA")
    rgba.putalpha(200)
    rgba.save(test / "stripes" / "rgba.png")
    _pil(_pattern(0, g)).convert("P", palette=Image.ADAPTIVE, colors=64).save(test / "circles" / "palette.png")
    _pil(torch.nn.functional.interpolate(_pattern(1, g)[None].float(), size=(48, 40))[0].to(torch.uint8)).save(
        test / "squares" / "wide.jpg", quality=92
    )
    good = (root / "test" / "circles" / "000.jpg").read_bytes()
    (root / "bad.jpg").write_bytes(good[: len(good) // 3])  # truncated mid-scan
    return root


@pytest.fixture(scope="session")
def seed_run(image_folder, tmp_path_factory):
    """A run directory of the seed CNN trained (2 short epochs) by the real trainer on image_folder."""
    out = tmp_path_factory.mktemp("runs") / "seed"
    train([*SMALL, "--dataset", "imagefolder", "--data-dir", image_folder, "--epochs", "2", "--out", out], check=0)
    return out
