"""The ImageNet-recipe augmentations, from torchvision.transforms.v2, made reproducible.

- Per image, on uint8 pixels after the crop and flip: auto-augment (`ra` RandAugment, `ta_wide`
  TrivialAugmentWide, `augmix` AugMix) and random erasing (filled with the dataset's mean colour, which
  is what erasing with 0 after normalization does in torchvision's reference).
- Per batch, on normalized images: MixUp and/or CutMix (one of them chosen at random per batch when
  both are on); the labels become class probabilities, which F.cross_entropy takes as soft targets.

v2 transforms draw from the global CPU generator. To make every draw a pure function of the run's
seed and the image's (or batch's) position -- so a resumed run replays exactly what an uninterrupted
one would have drawn -- each call runs inside torch.random.fork_rng with the CPU generator seeded
from a hash of (seed, epoch, plan position) for an image, or (seed, epoch, micro-step, rank) for a
batch. The caller's RNG state is untouched. Image draws do not depend on the world size; MixUp/CutMix
pair images within a rank's slice of the batch (as torchvision's reference does in its collate
function), so its draws do. Per-image work runs on the CPU (AugMix draws its mixing weights on the
tensor's device, whose generator this seeding does not cover).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

AUTO_AUGMENT = ("none", "ra", "ta_wide", "augmix")
_IMAGE_STREAM, _BATCH_STREAM = 1, 2  # keep per-image and per-batch draws apart


def draw_seed(*parts: int) -> int:
    """A 63-bit seed from integers: a hash, so neighbouring positions get unrelated streams."""
    digest = hashlib.blake2b(",".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _v2():
    # torchvision imports torch._dynamo (over a second of CPU per process): paid only by runs that augment.
    from torchvision.transforms import v2

    return v2


def auto_augment(name: str):
    if name == "none":
        return None
    v2 = _v2()
    interp = v2.InterpolationMode.BILINEAR  # the reference's default --interpolation
    return {
        "ra": v2.RandAugment(interpolation=interp),
        "ta_wide": v2.TrivialAugmentWide(interpolation=interp),
        "augmix": v2.AugMix(interpolation=interp),
    }[name]


class ImageAugment:
    """auto-augment and random erasing of each image of a uint8 batch, seeded by plan position."""

    def __init__(self, auto: str, random_erase: float, seed: int, fill: Sequence[float]):
        ops = [t for t in (auto_augment(auto),) if t is not None]
        if random_erase > 0:
            ops.append(_v2().RandomErasing(p=random_erase, value=[round(255 * m) for m in fill]))
        self.transform = _v2().Compose(ops) if ops else None
        self.seed = seed

    def __bool__(self) -> bool:
        return self.transform is not None

    def one(self, img: torch.Tensor, epoch: int, position: int) -> torch.Tensor:
        """One uint8 [C, H, W] image (e.g. in a DataLoader worker)."""
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(draw_seed(_IMAGE_STREAM, self.seed, epoch, position))
            return self.transform(img)

    def __call__(self, x: torch.Tensor, epoch: int, positions: range) -> torch.Tensor:
        """A uint8 batch [B, C, H, W] whose image i sits at plan position positions[i]."""
        if self.transform is None:
            return x
        cpu = x.cpu()
        out = torch.empty_like(cpu)
        with torch.random.fork_rng(devices=[]):
            for i, pos in enumerate(positions):
                torch.default_generator.manual_seed(draw_seed(_IMAGE_STREAM, self.seed, epoch, pos))
                out[i] = self.transform(cpu[i])
        return out.to(x.device, non_blocking=True)


class BatchMix:
    """MixUp / CutMix of a normalized batch; returns (images, soft labels [B, num_classes])."""

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, num_classes: int, seed: int, rank: int):
        ops = []
        if mixup_alpha > 0:
            ops.append(_v2().MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            ops.append(_v2().CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.transform = _v2().RandomChoice(ops) if len(ops) > 1 else (ops[0] if ops else None)
        self.seed, self.rank = seed, rank

    def __bool__(self) -> bool:
        return self.transform is not None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, epoch: int, step: int):
        if self.transform is None:
            return x, y
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(draw_seed(_BATCH_STREAM, self.seed, epoch, step, self.rank))
            return self.transform(x, y)
