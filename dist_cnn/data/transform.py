"""The recipe's per-image transforms (source.Recipe): the one evaluation transform, used by training's
evaluation, `dist-cnn eval`, `predict` and described in exports, and the training crop.

An image's random crop is a pure function of (seed, epoch, image index): torchvision's
RandomResizedCrop draws its parameters from a generator seeded with a hash of the three, wherever it
runs (a worker, the main process), so every world size and every resume sees the same crops.
"""

from __future__ import annotations

import hashlib
import struct

import torch

from dist_cnn.data.source import Recipe

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect ratios (torchvision's and timm's default)


def eval_transform(img: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    """uint8 [C, H, W] -> uint8 [C, S, S], S = recipe.image_size (Recipe's docstring)."""
    from torchvision.transforms.v2 import functional as TF  # imported on first use (slow to import)

    size = recipe.image_size
    if recipe.eval_resize == "center-crop":
        img = TF.resize(img, [recipe.shorter_side], antialias=True)
        return TF.center_crop(img, [size, size])
    if tuple(img.shape[1:]) == (size, size):
        return img
    return TF.resize(img, [size, size], antialias=True)


def _draw_seed(seed: int, epoch: int, index: int) -> int:
    digest = hashlib.blake2b(struct.pack("<qqq", seed, epoch, index), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class CropDraws:
    """RandomResizedCrop's parameters for image `index` in `epoch`: torchvision's own draw, under a
    generator state that depends on (seed, epoch, index) only -- not on the worker or the order."""

    def __init__(self, image_size: int, scale: tuple[float, float], seed: int):
        from torchvision.transforms.v2 import RandomResizedCrop

        self.rrc = RandomResizedCrop(image_size, scale=scale, ratio=RATIO, antialias=True)
        self.seed = seed

    def __call__(self, epoch: int, index: int, height: int, width: int) -> tuple[int, int, int, int]:
        shape_only = torch.empty((), dtype=torch.uint8).expand(3, height, width)  # no pixels needed
        with torch.random.fork_rng(devices=[]):
            # The CPU generator only: torch.manual_seed would also queue seeds for every accelerator
            # backend, formatting a stack trace each time (a third of a sample's decoding time).
            torch.default_generator.manual_seed(_draw_seed(self.seed, epoch, index))
            p = self.rrc.make_params([shape_only])
        return p["top"], p["left"], p["height"], p["width"]


def resized_crop(img: torch.Tensor, box: tuple[int, int, int, int], image_size: int) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    return TF.resized_crop(img, *box, size=[image_size, image_size], antialias=True)
