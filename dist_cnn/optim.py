"""SGD with decoupled parameter groups and a warmup schedule, as a LambdaLR so it checkpoints."""
from __future__ import annotations

import math

import torch

from .config import OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float):
    # Weight decay on biases and norm scales only hurts; the convention of timm and airbench.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.SGD:
    kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.SGD(param_groups(model, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum,
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
