"""Which autocast dtype to train in, and the context that applies it.

auto: bf16 on GPUs with bf16 in hardware (compute capability 8.0 and later), fp16 (with a GradScaler)
on the others: torch.cuda.is_bf16_supported() also says yes where bf16 is only emulated (V100, T4),
which runs slower than their fp16 tensor cores. On the CPU, fp32
without native bf16 matrix instructions (AMX or AVX-512 BF16); with them, whichever of the two runs
this model's training step faster (small convolutions such as the seed model's run slower under
CPU bf16 autocast, large ones faster). That is measured once per (CPU, threads, torch, model, input,
batch) and cached, so the same command on the same machine always resolves the same way, whatever
the machine's load at the next start.
BatchNorm stays fp32 under autocast by PyTorch's own op lists.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags.split() for f in ("amx_bf16", "avx512_bf16"))


def gpu_native_bf16(capability: tuple[int, int], hip: bool = False) -> bool:
    """bf16 arithmetic in hardware: NVIDIA compute capability 8.0 (Ampere) and later, and the ROCm GPUs
    torch supports; the rule of torch.cuda.is_bf16_supported(including_emulation=False)."""
    return hip or tuple(capability) >= (8, 0)


def cuda_bf16(device: torch.device) -> bool:
    return gpu_native_bf16(torch.cuda.get_device_capability(device), bool(torch.version.hip))


def resolve(precision: str, device: torch.device, step_seconds=None) -> str:
    """step_seconds(precision) -> seconds of one training step; used on CPUs with native bf16."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if cuda_bf16(device) else "fp16"
    if not cpu_has_native_bf16() or step_seconds is None:
        return "fp32"
    # bf16 must win clearly: a coin flip between equals would make runs differ for no gain.
    return "bf16" if step_seconds("bf16") < 0.85 * step_seconds("fp32") else "fp32"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dist_cnn" / "precision.json"


def resolve_auto(device: torch.device, what: dict, step_seconds=None) -> tuple[str, str]:
    """`--precision auto` as (precision, reason). `what` names the workload (model, input shape, batch);
    step_seconds(precision) times one training step and is called only when nothing is cached."""
    if device.type == "cuda":
        if cuda_bf16(device):
            return "bf16", "the GPU has bf16 in hardware"
        return "fp16", "the GPU has no bf16 in hardware (only emulated, slower): fp16 with loss scaling"
    if not cpu_has_native_bf16() or step_seconds is None:
        return "fp32", "the CPU has no native bf16 (AMX or AVX-512 BF16)"
    key_fields = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__, **what}
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_file()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    hit = cache.get(key) if isinstance(cache, dict) else None
    if isinstance(hit, dict) and hit.get("precision") in ("fp32", "bf16"):
        return hit["precision"], (
            f"measured before on this machine for this model and batch "
            f"(bf16 step {hit['speedup']:.2f}x fp32's speed; cached in {path})"
        )
    # bf16 must win clearly: a coin flip between equals would make runs differ for no gain.
    fp32, bf16 = step_seconds("fp32"), step_seconds("bf16")
    speedup = fp32 / max(bf16, 1e-12)
    choice = "bf16" if speedup > 1 / 0.85 else "fp32"
    cache[key] = {"precision": choice, "speedup": round(speedup, 3), **key_fields}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=1) + "\n")
        os.replace(tmp, path)
        where = f"saved in {path} for the next runs"
    except OSError as e:
        where = f"not cached: {path}: {e.strerror}"
    return choice, f"measured now: bf16 step {speedup:.2f}x fp32's speed on this CPU ({where})"


def time_training_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, repeats: int = 5):
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


def load_scaler(scaler: torch.amp.GradScaler, state: dict) -> bool:
    """A checkpoint's loss-scaler state; False when there is none to load into an fp16 run (the
    checkpoint was trained in bf16 or fp32, whose scaler is disabled and saves nothing): fp16's loss
    scale then starts fresh, as in a new run."""
    if not state and scaler.is_enabled():
        return False
    scaler.load_state_dict(state)
    return True
