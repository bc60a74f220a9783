"""Which autocast dtype to train in, and the context that applies it.

auto: bf16 on GPUs that support it, fp16 (with a GradScaler) on those that don't. On the CPU, fp32
without native bf16 matrix instructions (AMX or AVX-512 BF16); with them, whichever of the two runs
this model's training step faster, timed on a few steps at start-up (small convolutions such as the
seed model's run ~4x slower under CPU bf16 autocast, large ones faster).
BatchNorm stays fp32 under autocast by PyTorch's own op lists.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("amx_bf16", "avx512_bf16"))


def resolve(precision: str, device: torch.device, step_seconds=None) -> str:
    """step_seconds(precision) -> seconds of one training step; used on CPUs with native bf16."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if not cpu_has_native_bf16() or step_seconds is None:
        return "fp32"
    # bf16 must win clearly: a coin flip between equals would make runs differ for no gain.
    return "bf16" if step_seconds("bf16") < 0.85 * step_seconds("fp32") else "fp32"


def time_training_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int = 3):
    """A step_seconds for resolve(): times forward+backward of a copy (the model is left untouched)."""
    import copy
    import time
    probe = copy.deepcopy(model)

    def seconds(precision: str) -> float:
        best = float("inf")
        for i in range(repeats + 1):  # the first call warms up kernels and allocations
            t = time.perf_counter()
            with autocast(precision, x.device):
                loss = torch.nn.functional.cross_entropy(probe(x), y)
            loss.backward()
            probe.zero_grad(set_to_none=True)
            best = min(best, time.perf_counter() - t) if i else best
        return best
    return seconds


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Enabled only for fp16: bf16 and fp32 have fp32's exponent range and need no loss scaling."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
