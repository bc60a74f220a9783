"""One model preparation for training, `dist-cnn eval` and the benchmarks: build the architecture for
the data, fix the normalization, let the model see the data (or load saved weights), move it to the
device in the configured memory format. The same steps in the same order give the same arithmetic."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from dist_cnn.config import Config
from dist_cnn.data.loader import Normalize
from dist_cnn.data.source import DataSource
from dist_cnn.models.checks import check_output, select_output
from dist_cnn.models.registry import build_model
from dist_cnn.models.weights import init_from, load_pretrained
from dist_cnn.train.checkpoint import check_compatible, restore

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    model: nn.Module  # on the device, not wrapped in DDP
    normalize: Normalize  # uint8 batch -> normalized float batch on the device
    mean: list[float]
    std: list[float]


def prepare_model(
    cfg: Config,
    data: DataSource,
    device: torch.device,
    state: dict | None = None,
    *,
    factory: Callable[..., nn.Module] | None = None,
    starting_weights: bool = False,
) -> Prepared:
    """state: a checkpoint or model.pt whose weights to load (checked against this model first).
    factory: builds the model instead of the spec (the Python API). starting_weights: a new run, so
    --pretrained / --init-from apply (a resumed one loads its own checkpoint afterwards)."""
    shape = dict(in_channels=data.in_channels, num_classes=data.num_classes, image_size=data.image_size)
    model = factory(**shape) if factory else build_model(cfg.model.name, **shape)
    if state is not None and "mean" in state:
        mean, std = list(state["mean"]), list(state["std"])  # the run's own normalization, as trained
    else:
        mean, std = data.normalization(cfg.data.normalize)
    normalize = Normalize(mean, std, device, cfg.model.channels_last)
    if state is not None:
        check_compatible(
            state,
            cfg.model.name,
            state["config"]["data"]["dataset"],
            {k: tuple(v.shape) for k, v in model.state_dict().items()},
        )
        restore(state, {"model": model})
    else:
        if hasattr(model, "init_from_data"):  # e.g. airbench's whitening layer; same data on all ranks
            x, _ = data.probe(5000, cfg.train.seed)
            model.init_from_data(normalize(x.to(device)).cpu())
        if starting_weights and cfg.model.pretrained:
            load_pretrained(model, cfg.model.name, data.num_classes, data.in_channels)
        if starting_weights and cfg.model.init_from:
            init_from(model, cfg.model.init_from, data.num_classes)
    model.to(device)
    if cfg.model.channels_last:
        model.to(memory_format=torch.channels_last)
    select_output(model, cfg.model.output_key)
    x, _ = data.probe(2, cfg.train.seed)
    if len(x):  # once, before any step: the output is [batch, classes] logits
        check_output(model, normalize(x.to(device)), data.num_classes)
    return Prepared(model, normalize, mean, std)
