"""airbench's whitening bias: trained for the first N epochs (--freeze-whiten-bias-after), then frozen.

Frozen means the optimizer leaves it alone: no gradient, so SGD skips it (no update, no weight decay,
no momentum), and gradient clipping does not count it. Without DDP the switch happens once, at the
first epoch boundary past N: the bias stops requiring a gradient, as airbench does, and autograd no
longer computes the first layer's input gradient for it. DDP's reducer expects a gradient for every
parameter it was built with (static graph, buckets, and the grads-ready hook on the first layer), so
under DDP the gradient is still computed and all-reduced, and dropped after each backward pass.
"""

from __future__ import annotations

import torch


class WhitenBiasFreeze:
    def __init__(self, model: torch.nn.Module, after_epochs: int, ddp: bool):
        whiten = getattr(model, "whiten", None)
        self.bias = getattr(whiten, "bias", None) if whiten is not None else None
        self.after, self.ddp, self.frozen = after_epochs, ddp, False

    def epoch(self, epoch: int) -> None:
        """At the start of (or on resuming within) `epoch`."""
        if self.bias is None or self.frozen or epoch < self.after:
            return
        self.frozen = True
        if not self.ddp:
            self.bias.requires_grad_(False)
            self.bias.grad = None

    def after_backward(self) -> None:
        """Under DDP, once frozen: drop the bias's all-reduced gradient before clipping and the step."""
        if self.frozen and self.ddp:
            self.bias.grad = None
