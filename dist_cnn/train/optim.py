"""SGD with decoupled parameter groups and a warmup schedule, as a LambdaLR so it checkpoints."""

from __future__ import annotations

import math
import re
import warnings

import torch

from dist_cnn.config import OptimConfig


def param_groups(model: torch.nn.Module, cfg: OptimConfig):
    """Three groups: weights (ndim > 1), BatchNorm parameters (LR x bias_lr_scale, airbench's 64x group
    is exactly its BatchNorm biases) and the other biases. torch's SGD scales the weight decay by the
    group's LR, so a group whose LR is k times the base gets weight_decay / k: the decay per step
    (lr x weight_decay) is then the same for every group, as in airbench. Without bias_decay, biases and
    norm parameters get none (timm's convention)."""
    norm = {
        id(p)
        for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._NormBase)
        for p in m.parameters(recurse=False)
    }
    weights, norms, biases = [], [], []
    for p in model.parameters():
        if p.requires_grad:
            (norms if id(p) in norm else weights if p.ndim > 1 else biases).append(p)
    wd, scale = cfg.weight_decay, cfg.bias_lr_scale
    small_wd = wd if cfg.bias_decay else 0.0
    groups = [
        {"params": weights, "weight_decay": wd, "lr": cfg.lr},
        {"params": norms, "weight_decay": small_wd / scale, "lr": cfg.lr * scale},
        {"params": biases, "weight_decay": small_wd, "lr": cfg.lr},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: torch.nn.Module, cfg: OptimConfig, device: torch.device, fused: bool = False
) -> torch.optim.SGD:
    """SGD over param_groups; `fused` (see use_fused) where torch has the fused kernel for the device,
    foreach otherwise. The momentum buffers exist, zero, before the first step (zero_momentum)."""
    groups = param_groups(model, cfg)
    nesterov = cfg.nesterov and cfg.momentum > 0
    opt = None
    if fused:
        try:
            opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov, fused=True)
        except RuntimeError:  # no fused SGD kernel for this device in this torch
            opt = None
    if opt is None:
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov, foreach=True)
    zero_momentum(opt)
    return opt


def use_fused(device: torch.device) -> bool:
    """Fused SGD wherever torch has its kernel (CUDA, and the CPU): one pass over each parameter, where
    foreach makes five (on the CPU about a third of its time for a small model), and a non-finite step is
    skipped in the kernel (found_inf). Its CPU kernel contracts multiply-adds, so its weights differ
    from foreach's in the last bit; runs are compared with runs of the same optimizer."""
    return device.type in ("cuda", "cpu")


def zero_momentum(opt: torch.optim.SGD) -> None:
    """Zero momentum buffers for the parameters that have none yet (a new optimizer, or state loaded
    from a checkpoint written before the first step).

    Fused SGD creates its buffers uninitialized (empty_like) on its first step and fills them in the
    kernel; when that step is skipped (found_inf: a non-finite loss, or fp16's GradScaler, whose first
    steps routinely overflow) the kernel returns early and the next step would use that garbage as
    momentum. A zero buffer gives the same first update as none (with dampening 0, which this SGD
    always uses: 0 x momentum + grad is grad exactly), so nothing else changes."""
    for group in opt.param_groups:
        if group["momentum"] == 0:
            continue
        for p in group["params"]:
            state = opt.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak LR at optimizer step `step` of `total`."""
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "triangle":
        return triangle(step, total, cfg.lr_start, cfg.warmup, cfg.lr_end)
    warm = int(cfg.warmup * total)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)  # onecycle: linear up, linear down to zero


def triangle(step: int, total: int, start: float, peak_at: float, end: float) -> float:
    """airbench's schedule: linear from `start` at step 0 to 1 at step int(peak_at * total), then linear
    to `end` at step `total` (the first step already trains at `start`, not at 0)."""
    peak = int(peak_at * total)
    if step < peak:
        return start + (1.0 - start) * step / peak
    return 1.0 + (end - 1.0) * min(step - peak, total - peak) / max(1, total - peak)


def total_steps(epochs: float, steps_per_epoch: int, max_steps: int = 0) -> int:
    """Optimizer steps of a run: a fractional epoch count rounds up (airbench: ceil(9.9 x 48) = 476),
    after rounding away float noise (0.1 x 30 is 3.0000000000000004, which must stay 3 steps)."""
    steps = math.ceil(round(epochs * steps_per_epoch, 6))
    return min(steps, max_steps) if max_steps else steps


def build_schedule(optimizer, total_steps: int, cfg: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))


def advance(schedule: torch.optim.lr_scheduler.LRScheduler) -> None:
    """One step of the schedule, whether or not the optimizer stepped: the learning rate follows the
    step count, and a skipped step (a non-finite loss, fp16's overflow) counts. torch warns on a new
    schedule's first step when the optimizer has not stepped, taking it for calls in the wrong order;
    here it is a skipped first step, so that one warning is left out."""
    if schedule.last_epoch > 0:  # torch checks the order on the first step only
        schedule.step()
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()` before"), UserWarning)
        schedule.step()


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
        alpha = 1.0 if step == self.total else self.decay**self.every * (step / self.total) ** 3
        for k, v in self.model.state_dict().items():
            if k in self.ema:
                self.ema[k].lerp_(v, 1 - alpha)
                v.copy_(self.ema[k])

    def state_dict(self) -> dict:
        return dict(self.ema)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            self.ema[k].copy_(v)
