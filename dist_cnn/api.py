"""The Python API: `fit(model, train=..., test=..., **options)` runs the CLI's trainer on your objects.

    from dist_cnn import fit
    summary = fit(MyNet(), train="cifar10", epochs=10, batch_size=512, lr=0.4, out="runs/mynet")

- model: an nn.Module, a factory (called like a `--model package.module:factory` spec, with the
  keywords in_channels / num_classes / image_size it accepts), or any --model string.
- train / test: a built-in dataset name (train only; its own test split is used), or two map-style
  torch Datasets yielding (image, label): images are uint8 tensors [C, H, W] (0-255), float tensors in
  [0, 1] (ToTensor's output) or PIL images, all of one size; labels are ints. They are read once into
  memory as uint8 (the in-memory path, with the same normalization, augmentation and exact sharding as
  the built-in datasets); data larger than memory belongs in an image folder (`--dataset imagefolder`).
  Class names come from `train.classes` when it has them.
- options: every CLI option, by its config field name (`epochs=`, `batch_size=`, `lr=`, `out=`,
  `resume="auto"`, `mixup_alpha=` ...) or its flag name with underscores (`keep_checkpoints=`), and
  `config="file.toml"` (options override the file, as flags do).

Run it under torchrun, srun or plain python: every process calls fit() and it gets what the CLI gets
(DDP, exact sharding and evaluation, checkpoints and resume, stop signals, W&B on rank 0). Inside a
process group that already exists (a notebook, Lightning, Ray Train, your own launcher), fit() uses
that group and leaves it in place, so fit() can be called again. Ray Train: dist_cnn.ray. It returns
the run's summary dict (on every rank), or {"stopped": True, "step": N} when a stop signal ended it.
Bad options raise dist_cnn.errors.UserError (one line). The module passed in is trained in place.
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import torch
from torch import nn

from dist_cnn import config as config_mod
from dist_cnn.data.datasets import Dataset
from dist_cnn.errors import UserError
from dist_cnn.models.registry import call_factory, object_spec
from dist_cnn.train.trainer import train as run_training

API_DATASET = "python"  # the dataset name recorded when fit() gets Dataset objects


def option_fields() -> dict[str, tuple[str, str]]:
    """option name -> (section, field): the field name, and the flag's name where it differs."""
    out = {}
    for section, cls in config_mod.sections():
        for f in fields(cls):
            out[f.name] = (section, f.name)
            flag = config_mod.flag_name(f)[2:].replace("-", "_")
            out.setdefault(flag, (section, f.name))
    for skip in ("name", "model", "dataset"):  # given as fit's own arguments
        out.pop(skip, None)
    return out


def build_config(options: dict) -> config_mod.Config:
    cfg = config_mod.Config()
    path = options.pop("config", None)
    trust = bool(options.pop("trust_model_code", False))
    given: set[str] = set()
    if path:
        data = config_mod.load_file(str(path))
        config_mod.apply_dict(cfg, data, where=f"config file {path}")
        given = config_mod.keys_of(data)
    known, nested = option_fields(), {}
    for key, value in options.items():
        if key not in known:
            raise UserError(f"fit(): unknown option {key!r} (options are the CLI's, e.g. epochs, batch_size, lr, out)")
        section, name = known[key]
        nested.setdefault(section, {})[name] = str(value) if name == "out" else value
    config_mod.apply_dict(cfg, nested, where="fit()")
    config_mod.mark_given(cfg, given | config_mod.keys_of(nested), trust_model_code=trust)
    return cfg


def _image(img, where: str) -> torch.Tensor:
    if not isinstance(img, torch.Tensor):
        from PIL import Image

        if not isinstance(img, Image.Image):
            raise UserError(f"{where}: images must be tensors or PIL images, got {type(img).__name__}")
        from torchvision.transforms.v2 import functional as TF

        img = TF.pil_to_tensor(img.convert("RGB") if img.mode not in ("L", "RGB") else img)
    if img.ndim == 2:
        img = img.unsqueeze(0)
    if img.ndim != 3:
        raise UserError(f"{where}: images must be [C, H, W], got shape {tuple(img.shape)}")
    if img.dtype == torch.uint8:
        return img
    if img.is_floating_point():
        if img.numel() and not (0 <= float(img.min()) and float(img.max()) <= 1):
            raise UserError(
                f"{where}: float images must be in [0, 1] (ToTensor's output), got values in "
                f"[{float(img.min()):.3g}, {float(img.max()):.3g}]; normalization is dist_cnn's job"
            )
        return img.mul(255).round_().to(torch.uint8)
    raise UserError(f"{where}: images must be uint8 or float tensors, got {img.dtype}")


def _label(value, where: str) -> int:
    """An integer class index: ints, numpy integers, one-element integer tensors. Anything else (a
    float would be truncated, a string is a class name) is one line."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point():
        value = value.item()
    if isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    hint = "; map class names to indices and pass classes=[...]" if isinstance(value, str) else ""
    raise UserError(
        f"{where}: labels must be integer class indices, got {type(value).__name__} {str(value)[:40]!r}{hint}"
    )


def materialize(ds, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A map-style Dataset of (image, label) as uint8 [N, C, H, W] and int64 [N] tensors."""
    try:
        n = len(ds)
    except TypeError:
        raise UserError(f"{where}: needs a map-style Dataset (with __len__ and __getitem__)") from None
    if n == 0:
        raise UserError(f"{where}: the dataset is empty")
    xs, ys = [], []
    for i in range(n):
        item = ds[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise UserError(f"{where}[{i}]: must be an (image, label) pair")
        x = _image(item[0], f"{where}[{i}]")
        if xs and x.shape != xs[0].shape:
            raise UserError(
                f"{where}[{i}]: image shape {tuple(x.shape)} differs from {tuple(xs[0].shape)}; "
                f"resize in the dataset's transform"
            )
        xs.append(x)
        ys.append(_label(item[1], f"{where}[{i}]"))
    return torch.stack(xs).contiguous(), torch.tensor(ys, dtype=torch.int64)


def datasets_from(train, test, classes=None) -> Dataset:
    if test is None:
        raise UserError("fit(): with a Dataset as train=, also pass test= (a Dataset of the same kind)")
    train_x, train_y = materialize(train, "train")
    test_x, test_y = materialize(test, "test")
    if test_x.shape[1:] != train_x.shape[1:]:
        raise UserError(f"test images are {tuple(test_x.shape[1:])}, train images {tuple(train_x.shape[1:])}")
    if train_x.shape[2] != train_x.shape[3]:
        raise UserError(f"images must be square, got {tuple(train_x.shape[2:])}; crop or resize in the transform")
    top = int(max(train_y.max(), test_y.max()))
    classes = list(classes or getattr(train, "classes", None) or [str(i) for i in range(top + 1)])
    if int(min(train_y.min(), test_y.min())) < 0 or top >= len(classes):
        raise UserError(f"labels must be in [0, {len(classes)}), got [{int(min(train_y.min(), test_y.min()))}, {top}]")
    return Dataset(API_DATASET, [str(c) for c in classes], train_x, train_y, test_x, test_y)


def model_factory(model, spec: str):
    """A function (in_channels, num_classes, image_size) -> nn.Module for the trainer."""
    if isinstance(model, nn.Module):
        return lambda in_channels, num_classes, image_size: model
    return lambda in_channels, num_classes, image_size: call_factory(model, spec, in_channels, num_classes, image_size)


def configure(model, train="cifar10", test=None, options: dict | None = None):
    """fit()'s arguments checked and turned into (config, model factory or None); nothing is read yet."""
    cfg = build_config(dict(options or {}))
    factory = None
    if isinstance(model, str):
        cfg.model.name = model
    elif isinstance(model, nn.Module) or callable(model):
        cfg.model.name = object_spec(model)
        factory = model_factory(model, cfg.model.name)
    else:
        raise UserError(f"fit(): model must be an nn.Module, a factory or a --model string, got {type(model).__name__}")
    if isinstance(train, str):
        if test is not None:
            raise UserError("fit(): a built-in dataset brings its own test split; leave test= out")
        cfg.data.dataset = train
        config_mod.validate(cfg)
    else:
        cfg.data.dataset = "synthetic"  # any valid name, for validation of the other fields
        config_mod.validate(cfg)
        cfg.data.dataset = API_DATASET
    # fit()'s own arguments are given too: a resume refuses another model or dataset
    given = config_mod.given_keys(cfg) | {"model.name", "data.dataset"}
    config_mod.mark_given(cfg, given, trust_model_code=config_mod.trusts_model_code(cfg))
    return cfg, factory


def fit(model, train="cifar10", test=None, *, classes=None, **options) -> dict:
    cfg, factory = configure(model, train, test, options)
    data = None if isinstance(train, str) else datasets_from(train, test, classes)
    return run_training(cfg, data=data, model_factory=factory)
