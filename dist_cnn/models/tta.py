"""Test-time augmentation: the mean of a model's logits over mirrored and shifted views (airbench94's infer)."""

import torch
import torch.nn.functional as F
from torch import nn

from dist_cnn.errors import UserError


def tta_logits(model: nn.Module, x: torch.Tensor, level: int) -> torch.Tensor:
    """Test-time augmentation as airbench94's infer: 0 = plain, 1 = mean with the mirror image,
    2 = half that, half the mirrored views translated by one pixel up-left and down-right."""
    if level == 0:
        return model(x)
    mirror = lambda v: 0.5 * model(v) + 0.5 * model(v.flip(-1))
    if level == 1:
        return mirror(x)
    if level == 2:
        h, w = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = [mirror(padded[..., :h, :w]), mirror(padded[..., 2:, 2:])]
        return 0.5 * mirror(x) + 0.25 * shifted[0] + 0.25 * shifted[1]
    raise UserError(f"TTA level must be 0, 1 or 2, got {level}")
