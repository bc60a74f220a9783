"""Data parallelism: how the model is wrapped for DDP (and compiled), with deliberate settings."""
from __future__ import annotations

import inspect

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from .config import ModelConfig
from .distributed import DistEnv

# torch 2.14 renamed broadcast_buffers; older releases (which pyproject allows) only know the old name.
_SYNC_BUFFERS = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
    else "broadcast_buffers"


def wrap(model: torch.nn.Module, env: DistEnv, cfg: ModelConfig, grad_accum: int):
    """Returns (the module to train, the plain module whose state_dict is checkpointed)."""
    raw = model
    if env.world_size > 1:
        if cfg.sync_bn:
            raw = model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        has_buffers = any(True for _ in model.buffers())
        model = DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                    gradient_as_bucket_view=True,  # grads live in the all-reduce buckets: no copy
                    bucket_cap_mb=25,
                    # the graph is the same every step, except under no_sync accumulation
                    static_graph=grad_accum == 1,
                    **{_SYNC_BUFFERS: has_buffers})  # BatchNorm stats from rank 0; nothing to send otherwise
    if cfg.compile:
        model = torch.compile(model)  # after DDP, so DDPOptimizer splits graphs at bucket boundaries
    return model, raw
