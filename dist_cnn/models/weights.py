"""Starting weights: torchvision/timm pretrained weights (--pretrained) and dist_cnn runs (--init-from).

Both go through `load_into`: every key must exist on both sides with the same shape, except one
classifier head whose first dimension is the class count. That head keeps its fresh initialization
(fine-tuning on another label set) and the log says so; any other difference is a one-line error.
Files are read with torch.load(weights_only=True); nothing is downloaded (compute nodes are often
offline): torchvision's weights must already be in the torch hub cache.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from dist_cnn.errors import UserError, one_line
from dist_cnn.models.registry import TV_NO_AUX, parse_spec, tv_weights
from dist_cnn.train import checkpoint

log = logging.getLogger(__name__)


def hub_file(url: str) -> Path:
    """Where torch.hub (and so torchvision) keeps a downloaded weights file."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def load_pretrained(model: nn.Module, spec: str, num_classes: int, in_channels: int) -> None:
    s = parse_spec(spec)
    if s.kind == "torchvision":
        url = tv_weights(s.name).url
        path = hub_file(url)
        if not path.is_file():
            raise UserError(
                f"--pretrained: torchvision:{s.name} weights not found at {path}; download {url} "
                f"there (or set TORCH_HOME), e.g. on a machine with network access"
            )
        state = _read(path, f"--pretrained: {path}")
        if s.name in TV_NO_AUX:  # built without the auxiliary heads (see registry.py)
            state = {k: v for k, v in state.items() if not k.startswith(("AuxLogits.", "aux1.", "aux2."))}
        load_into(model, state, num_classes, f"torchvision:{s.name} weights")
    elif s.kind == "timm":
        import timm

        try:  # timm reads its hub cache (or downloads), and adapts in_chans and the head itself
            ref = timm.create_model(s.name, pretrained=True, num_classes=num_classes, in_chans=in_channels)
        except Exception as e:
            raise UserError(
                f"--pretrained: timm could not load weights for {s.name} ({one_line(e)[:200]}); "
                f"put them in the "
                f"Hugging Face cache (HF_HOME) on a machine with network access"
            ) from None
        trained = ref.pretrained_cfg.get("num_classes")
        model.load_state_dict(ref.state_dict())
        if trained and trained != num_classes:
            log.info(
                f"timm:{s.name} weights: classifier head re-initialized for {num_classes} classes "
                f"(the weights are for {trained})"
            )
    else:
        raise UserError(
            "--pretrained works with torchvision: and timm: models; start your own model from a "
            "dist_cnn run with --init-from PATH"
        )


def init_from(model: nn.Module, path: str, num_classes: int) -> None:
    """The weights of a dist_cnn model.pt or checkpoint (its `model` entry)."""
    state = _read(Path(path), f"--init-from {path}", whole=True)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise UserError(f"--init-from {path}: not a dist_cnn model.pt or checkpoint (no 'model' weights)")
    load_into(model, state["model"], num_classes, f"--init-from {path}")


def _read(path: Path, what: str, whole: bool = False) -> dict:
    if whole:
        return checkpoint.load(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{what}: unreadable ({one_line(e)[:200]})") from None


def load_into(model: nn.Module, state: dict, num_classes: int, source: str) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        example = f"{len(missing)} missing here (e.g. {missing[0]})" if missing else ""
        example += ("; " if missing and unexpected else "") + (
            f"{len(unexpected)} not in this model (e.g. {unexpected[0]})" if unexpected else ""
        )
        raise UserError(f"{source}: the weights do not fit this model: {example}")
    mismatched = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
    heads = {k.rsplit(".", 1)[0] for k in mismatched}
    is_head = len(heads) == 1 and all(
        own[k].ndim >= 1 and own[k].shape[0] == num_classes and own[k].shape[1:] == state[k].shape[1:]
        for k in mismatched
    )
    if mismatched and not is_head:
        k = mismatched[0]
        raise UserError(
            f"{source}: the weights do not fit this model: {k} is {tuple(state[k].shape)} there, "
            f"{tuple(own[k].shape)} here"
        )
    merged = {k: (own[k] if k in mismatched else state[k]) for k in own}
    model.load_state_dict(merged)
    if mismatched:
        log.info(
            f"{source}: classifier head {heads.pop()} re-initialized for {num_classes} classes "
            f"(the weights have {state[mismatched[0]].shape[0]})"
        )
