"""Model EMA (--model-ema): an exponential moving average of the weights, evaluated beside the model.

torch.optim.swa_utils.AveragedModel with get_ema_multi_avg_fn, parameters and buffers (BatchNorm
statistics) alike, as torchvision's classification reference does. The reference's decay adjustment
is kept so one --model-ema-decay suits any batch size and length: the decay per update becomes
1 - min(1, (1 - decay) * global_batch * every / epochs). During the LR warmup the average is reset at
every update (it follows the weights), as in the reference. Its state (weights and update count) is
part of each checkpoint, so a resumed run continues the same average.
"""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def adjusted_decay(decay: float, global_batch: int, every: int, epochs: int) -> float:
    return 1.0 - min(1.0, (1.0 - decay) * global_batch * every / epochs)


def plain_weights(entry: dict) -> dict:
    """A file's `ema` entry as the model's own weights: a checkpoint holds the AveragedModel's state
    (module.* and its update count), model.pt the plain module's."""
    return {k.removeprefix("module."): v for k, v in entry.items() if k != "n_averaged"}


class ModelEMA:
    def __init__(self, model: torch.nn.Module, decay: float, every: int, warmup_steps: int):
        self.decay, self.every, self.warmup_steps = decay, every, warmup_steps
        # on the model's device, n_averaged included: on the CPU it would be copied to the GPU at every update
        device = next(model.parameters()).device
        self.avg = AveragedModel(model, device=device, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.avg.eval()
        for p in self.avg.parameters():
            p.requires_grad_(False)

    @property
    def module(self) -> torch.nn.Module:
        return self.avg.module

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """After optimizer step `step` (1-based): every `every` steps, as the reference."""
        if step % self.every:
            return
        self.avg.update_parameters(model)
        if step <= self.warmup_steps:
            self.avg.n_averaged.fill_(0)  # the next update copies the weights

    def state_dict(self) -> dict:
        return self.avg.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.avg.load_state_dict(state)
