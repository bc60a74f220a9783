"""Which autocast dtype to train in, and the context that applies it.

auto: bf16 on GPUs that support it, fp16 (with a GradScaler) on those that don't; on the CPU bf16 only
where the CPU has native bf16 matrix instructions (AMX or AVX-512 BF16), fp32 otherwise.
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


def resolve(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Enabled only for fp16: bf16 and fp32 have fp32's exponent range and need no loss scaling."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
