"""What a model must be before it is trained or evaluated, checked once on one small batch.

A model maps [N, C, S, S] images to a tensor of [N, classes] logits. One returning more logits than
classes would train and fill a wrong confusion matrix; fewer, a tuple, a dict or nothing trainable
would fail deep inside torch. Each is one line here, before any step. A model whose forward returns
a tuple or a dict says which element holds the logits with --output-key (an index or a key): a
forward hook then returns that element, the state dict is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_cnn.errors import UserError, one_line


def _describe(out) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {list(out.shape)}"
    if isinstance(out, dict):
        return f"a dict with keys {', '.join(map(repr, list(out)[:6]))}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)}"
    return f"a {type(out).__name__}"


def pick(out, key: str):
    """The element `key` (an index or a dict key, as text) of a model's tuple/list/dict output."""
    if isinstance(out, dict):
        if key in out:
            return out[key]
        raise UserError(f"--output-key {key}: the model returns a dict with keys {', '.join(map(repr, out))}")
    if isinstance(out, (tuple, list)):
        try:
            return out[int(key)]
        except (ValueError, IndexError):
            raise UserError(f"--output-key {key}: the model returns a {type(out).__name__} of {len(out)}") from None
    raise UserError(f"--output-key {key}: the model returns {_describe(out)}, not a tuple or a dict")


def select_output(model: nn.Module, key: str) -> None:
    """Make `model(x)` return element `key` of its output (no-op for an empty key)."""
    if key:
        model.register_forward_hook(lambda module, args, out: pick(out, key))


def check_output(model: nn.Module, x: torch.Tensor, num_classes: int) -> None:
    """One forward pass on x (a few normalized images) in training mode, as the first step will run
    it; BatchNorm statistics and the RNG are left as they were, so results do not change."""
    buffers = {k: v.clone() for k, v in model.state_dict().items() if not isinstance(v, nn.Parameter)}
    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(x.device) if x.device.type == "cuda" else None
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            out = model(x)
    except UserError:
        raise
    except Exception as e:
        raise UserError(
            f"the model fails on a batch of {len(x)} images {list(x.shape[1:])}: {type(e).__name__}: {one_line(e, 200)}"
        ) from None
    finally:
        model.load_state_dict(buffers, strict=False)
        model.train(was_training)
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, x.device)
    want = [len(x), num_classes]
    if isinstance(out, (tuple, list, dict)):
        raise UserError(
            f"the model returns {_describe(out)}, not a tensor of logits {want}; say which element holds "
            "the logits with --output-key (an index or a key)"
        )
    if not isinstance(out, torch.Tensor) or list(out.shape) != want:
        raise UserError(
            f"the model returns {_describe(out)} for {len(x)} images of {num_classes} classes; it must "
            f"return logits of shape [batch, classes] = {want}"
        )
    if not out.is_floating_point():
        raise UserError(f"the model returns {out.dtype} values; logits must be floating point")


def check_trainable(model: nn.Module, per_rank_batch: int, sync_bn: bool) -> None:
    """Something to train, and a per-rank micro-batch BatchNorm can take statistics of."""
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError("the model has no trainable parameters (none, or all with requires_grad=False)")
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if has_bn and per_rank_batch < 2 and not sync_bn:
        raise UserError(
            f"the model has BatchNorm layers and each rank trains on {per_rank_batch} image per micro-batch "
            "(--batch-size / world size / --grad-accum): BatchNorm needs at least 2; raise --batch-size, "
            "lower --grad-accum or the world size, or use --sync-bn"
        )
