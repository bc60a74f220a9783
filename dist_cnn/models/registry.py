"""Models: the registry of built-in architectures, and model specs for everything else.

`--model` takes a built-in name (`seed`, `resnet18`, `airbench`; adding one is a decorated function) or
a spec:
- `torchvision:NAME`: a classification model of torchvision.models (`torchvision:resnet50`);
- `timm:NAME`: a timm model (needs `pip install dist_cnn[timm]`);
- `package.module:attr`: the user's own factory function or nn.Module class, importable from the Python
  path or the current directory. It is called with the keywords `in_channels`, `num_classes` and
  `image_size`, each only if its signature names it (or takes **kwargs), and must return an nn.Module.
A model passed to the Python API as an object is recorded as `python:module.qualname` (not rebuildable
from the spec alone).

Every model maps [N, in_channels, image_size, image_size] float images to [N, num_classes] logits. A
model that wants to see data before training (airbench's whitening layer) exposes
`init_from_data(images)`; the trainer calls it, on every rank with the same images, before DDP.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from dist_cnn.errors import UserError, one_line

# The built-in architectures, one module each; their names stay importable from here.
from dist_cnn.models.airbench import Airbench, airbench, whitening_weights  # noqa: F401
from dist_cnn.models.resnet import ResNet18, resnet18  # noqa: F401
from dist_cnn.models.seed import SeedNet, seed  # noqa: F401
from dist_cnn.models.tta import tta_logits  # noqa: F401

MODELS: dict[str, Callable[..., nn.Module]] = {}
SPEC_FORMS = ("torchvision:NAME", "timm:NAME", "package.module:factory")
# Built with aux_logits off: in training mode their auxiliary heads make forward return a tuple.
TV_NO_AUX = {"inception_v3", "googlenet"}


def register(name: str):
    """Decorator: `@register("mynet") def mynet(in_channels, num_classes, image_size): ...`"""

    def deco(fn):
        if name in MODELS:  # two builders under one name is always a mistake; fail at import time
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = fn
        return fn

    return deco


for _name, _factory in (("seed", seed), ("resnet18", resnet18), ("airbench", airbench)):
    register(_name)(_factory)


@dataclass(frozen=True)
class Spec:
    kind: str  # builtin, torchvision, timm, module, python
    name: str  # the registry name, the library's model name, or "module:attr"


def parse_spec(spec: str) -> Spec:
    """The form of a --model value, checked for syntax only (nothing is imported)."""
    if spec in MODELS:
        return Spec("builtin", spec)
    prefix, sep, rest = spec.partition(":")
    if sep and prefix in ("torchvision", "timm", "python") and rest:
        return Spec(prefix, rest)
    if sep and rest and all(part.isidentifier() for part in prefix.split(".") + rest.split(".")):
        return Spec("module", spec)
    raise UserError(
        f"unknown model {spec!r}; known models: {', '.join(sorted(MODELS))}, or a spec: {', '.join(SPEC_FORMS)}"
    )


def model_help() -> str:
    return (
        f"model: a built-in ({', '.join(MODELS)}) or torchvision:NAME (any torchvision classification "
        f"model), timm:NAME (needs timm), package.module:factory (your own nn.Module class or function, "
        f"called with in_channels, num_classes, image_size)"
    )


def short_name(spec: str) -> str:
    """A file-name friendly name of the model (run directory names)."""
    return spec.rsplit(":", 1)[-1].rsplit(".", 1)[-1]


def check_spec(spec: str) -> Spec:
    """Everything about a spec that can be known before the data is: the library or module imports and
    names a model. Raises a one-line UserError otherwise."""
    s = parse_spec(spec)
    if s.kind == "torchvision":
        _tv_names(s.name)
    elif s.kind == "timm":
        if not _timm().is_model(s.name):
            raise UserError(f"timm has no model {s.name!r} (see timm.list_models())")
    elif s.kind == "module":
        _user_callable(s.name)
    return s


def build_model(spec: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """A freshly initialized model (pretrained weights are loaded separately: weights.py)."""
    s = check_spec(spec)
    if s.kind == "builtin":
        return MODELS[s.name](in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    if s.kind == "torchvision":
        return _torchvision(s.name, in_channels, num_classes, image_size)
    if s.kind == "timm":
        return _timm().create_model(s.name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    if s.kind == "module":
        return call_factory(_user_callable(s.name), spec, in_channels, num_classes, image_size)
    raise UserError(
        f"model {spec!r} was given to the Python API as an object and cannot be rebuilt from "
        f"its name; load the weights into it in Python"
    )


# ---- torchvision ---------------------------------------------------------------------------------


def _tv_names(name: str) -> None:
    import torchvision.models

    names = torchvision.models.list_models(module=torchvision.models)  # classification models only
    if name not in names:
        close = [n for n in names if n.startswith(name[:4])][:6]
        raise UserError(
            f"torchvision has no classification model {name!r}"
            + (f" (similar: {', '.join(close)})" if close else " (see torchvision.models.list_models())")
        )


def tv_weights(name: str):
    """torchvision's default weights enum member of a model (its URL, categories and minimum size)."""
    import torchvision.models

    return torchvision.models.get_model_weights(name).DEFAULT


def _torchvision(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    import torchvision.models

    if in_channels != 3:
        raise UserError(f"torchvision:{name} takes 3-channel images, the dataset has {in_channels}")
    kw: dict = {"num_classes": num_classes}
    min_h, min_w = tv_weights(name).meta.get("min_size", (1, 1))
    if name.startswith("vit_"):
        kw["image_size"] = image_size  # ViTs are built for one size; any multiple of the patch works
        min_h = min_w = int(name.split("_")[-1]) if name.split("_")[-1].isdigit() else 1
        if image_size % min_h:
            raise UserError(
                f"torchvision:{name} needs an image size divisible by its patch size {min_h}, got {image_size}"
            )
    if name in TV_NO_AUX:
        kw["aux_logits"] = False
        kw["init_weights"] = True
    if image_size < max(min_h, min_w):
        raise UserError(
            f"torchvision:{name} needs images of at least {min_h}x{min_w} pixels, got --image-size {image_size}"
        )
    return torchvision.models.get_model(name, **kw)


# ---- timm ----------------------------------------------------------------------------------------


def _timm():
    try:
        import timm
    except ImportError:
        raise UserError("--model timm:... needs timm: pip install 'dist_cnn[timm]' (or pip install timm)") from None
    return timm


# ---- the user's own module -----------------------------------------------------------------------


# Modules that moved: specs recorded by earlier versions (the Python API records `module:name`) still resolve.
MOVED = {"dist_cnn.models": "dist_cnn.models.registry"}


def _user_callable(target: str):
    module_name, _, attr = target.partition(":")
    module_name = MOVED.get(module_name, module_name)
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # torchrun puts the script's folder on the path, not the cwd
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise UserError(
                f"--model {target}: no module {e.name!r} on the Python path or in the current directory"
            ) from None
        raise UserError(f"--model {target}: importing {module_name} failed: {e}") from None
    except Exception as e:  # the user's module itself raised: its first line is the useful part
        raise UserError(
            f"--model {target}: importing {module_name} failed: {type(e).__name__}: {one_line(e)}"
        ) from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"--model {target}: module {module_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"--model {target}: {attr} is a {type(obj).__name__}, not a factory or nn.Module class")
    return obj


def factory_kwargs(fn, **available) -> dict:
    """The subset of `available` that fn's signature accepts (all of them if it takes **kwargs)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: offer everything
        return available
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return available
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return {k: v for k, v in available.items() if k in names}


def call_factory(fn, spec: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    kw = factory_kwargs(fn, in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    try:
        model = fn(**kw)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"--model {spec}: calling it with {kw} failed: {type(e).__name__}: {one_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--model {spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def object_spec(obj) -> str:
    """The spec recorded for a model (or factory) given to the Python API as an object: `module:qualname`
    where that can be imported again (so `dist-cnn eval` rebuilds it), else `python:module.qualname`."""
    target = obj if callable(obj) and not isinstance(obj, nn.Module) else type(obj)
    module, qual = getattr(target, "__module__", ""), getattr(target, "__qualname__", type(target).__name__)
    if isinstance(obj, nn.Module) or module in ("__main__", "") or "<" in qual:
        return f"python:{module}.{qual}"
    return f"{module}:{qual}"
