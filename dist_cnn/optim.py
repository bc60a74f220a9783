"""SGD with decoupled parameter groups and a warmup schedule, as a LambdaLR so it checkpoints."""
from __future__ import annotations

import math

import torch

from .config import OptimConfig


def param_groups(model: torch.nn.Module, cfg: OptimConfig):
    # Weight decay on biases and norm scales only hurts (timm's convention); airbench also gives them
    # a much larger LR (bias_lr_scale).
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr},
            {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr * cfg.bias_lr_scale}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.SGD:
    kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum,
                           nesterov=cfg.nesterov and cfg.momentum > 0, **kw)


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak LR at optimizer step `step` of `total`."""
    if cfg.schedule == "constant":
        return 1.0
    warm = int(cfg.warmup * total)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)  # onecycle: linear up, linear down to zero


def build_schedule(optimizer, total_steps: int, cfg: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))


class Lookahead:
    """airbench's lookahead: every k steps the EMA moves toward the weights, and the weights are reset
    to the EMA. The decay ramps up cubically (little averaging early, heavy at the end), and the last
    step copies the EMA in outright. BatchNorm statistics are averaged the same way."""

    def __init__(self, model: torch.nn.Module, every: int, decay: float, total_steps: int):
        self.model, self.every, self.decay, self.total = model, every, decay, total_steps
        self.ema = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def step(self, step: int) -> None:
        if step % self.every and step != self.total:
            return
        alpha = 1.0 if step == self.total else self.decay ** self.every * (step / self.total) ** 3
        for k, v in self.model.state_dict().items():
            if k in self.ema:
                self.ema[k].lerp_(v, 1 - alpha)
                v.copy_(self.ema[k])

    def state_dict(self) -> dict:
        return dict(self.ema)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            self.ema[k].copy_(v)
