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

import torch
import torch.nn.functional as F
from torch import nn

from dist_cnn.errors import UserError, one_line

MODELS: dict[str, Callable[..., nn.Module]] = {}
SPEC_FORMS = ("torchvision:NAME", "timm:NAME", "package.module:factory")
# Built with aux_logits off: in training mode their auxiliary heads make forward return a tuple.
_TV_NO_AUX = {"inception_v3", "googlenet"}


def register(name: str):
    """Decorator: `@register("mynet") def mynet(in_channels, num_classes, image_size): ...`"""

    def deco(fn):
        if name in MODELS:  # two builders under one name is always a mistake; fail at import time
            raise ValueError(f"model {name!r} is already registered")
        MODELS[name] = fn
        return fn

    return deco


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
    if name in _TV_NO_AUX:
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
_MOVED = {"dist_cnn.models": "dist_cnn.models.registry"}


def _user_callable(target: str):
    module_name, _, attr = target.partition(":")
    module_name = _MOVED.get(module_name, module_name)
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


# ----------------------------------------------------------------------------------------------------
# seed: a widened PyTorch-tutorial CNN (the published tutorial Net is conv 3->6->16 5x5, fc 400-120-84-10,
# 62,006 params; this one uses 3x3 padded convs 3->16->32 and fc 2048-120-84-10: 261,982 params at 3x32x32)


class SeedNet(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc1 = nn.Linear(32 * (image_size // 4) ** 2, 120)  # two 2x pools floor the size twice
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


@register("seed")
def seed(in_channels, num_classes, image_size):
    if image_size < 4:
        raise UserError(f"seed needs images of at least 4x4 pixels, got {image_size}")
    return SeedNet(in_channels, num_classes, image_size)


# ----------------------------------------------------------------------------------------------------
# resnet18: the CIFAR variant (3x3 stride-1 stem, no max-pool), 11,173,962 params at 10 classes


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:  # projection only where the shapes change
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
        layers, cin = [], 64
        for i, cout in enumerate((64, 128, 256, 512)):
            for j in range(2):
                layers.append(BasicBlock(cin, cout, stride=2 if i > 0 and j == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


@register("resnet18")
def resnet18(in_channels, num_classes, image_size):
    return ResNet18(in_channels, num_classes)


# ----------------------------------------------------------------------------------------------------
# airbench: the airbench94 network (github.com/KellerJordan/cifar10-airbench, airbench94.py)


class Conv(nn.Conv2d):
    """Bias-free 3x3 conv whose first in_channels filters start as identity: an implicit residual."""

    def __init__(self, cin, cout, kernel_size=3, padding=1, bias=False):
        super().__init__(cin, cout, kernel_size=kernel_size, padding=padding, bias=bias)

    def reset_parameters(self):
        super().reset_parameters()
        if self.bias is not None:
            self.bias.data.zero_()
        w = self.weight.data
        torch.nn.init.dirac_(w[: w.size(1)])


class BatchNorm(nn.BatchNorm2d):
    """airbench's BN: running stats follow the batch fast (airbench momentum 0.6 = torch momentum 0.4),
    scale frozen at 1 (it would only fight the weight decay of the next conv), shift trainable."""

    def __init__(self, num_features, momentum=0.6, eps=1e-12):
        super().__init__(num_features, eps=eps, momentum=1 - momentum)
        self.weight.requires_grad = False


class ConvGroup(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv1 = Conv(cin, cout)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = BatchNorm(cout)
        self.conv2 = Conv(cout, cout)
        self.norm2 = BatchNorm(cout)
        self.activ = nn.GELU()

    def forward(self, x):
        x = self.activ(self.norm1(self.pool(self.conv1(x))))
        return self.activ(self.norm2(self.conv2(x)))


def patch_moments(images: torch.Tensor, k: int = 2, chunk: int = 1024) -> torch.Tensor:
    """Uncentered second moment E[p p^T] of all k x k patches, p flattened in (c, h, w) order (as
    airbench; the inputs are normalized so it is ~the covariance). Chunked: 5000 CIFAR images would
    otherwise materialize ~230 MB of patches."""
    c = images.shape[1]
    acc, n = torch.zeros(c * k * k, c * k * k, dtype=torch.float64), 0
    for x in images.split(chunk):
        p = x.double().unfold(2, k, 1).unfold(3, k, 1)  # [N, C, H', W', k, k]
        p = p.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * k * k)
        acc += p.T @ p
        n += p.shape[0]
    return acc / n


def whitening_weights(images: torch.Tensor, eps: float = 5e-4, k: int = 2) -> torch.Tensor:
    """Conv weights [2*C*k*k, C, k, k]: the patch-covariance eigenvectors (largest eigenvalue first)
    scaled by 1/sqrt(eigval + eps), then their negatives, so GELU sees both signs of every direction."""
    c = images.shape[1]
    eigvals, eigvecs = torch.linalg.eigh(patch_moments(images, k))  # ascending; columns are vectors
    eigvals, eigvecs = eigvals.flip(0), eigvecs.T.flip(0)  # rows, descending as airbench
    w = (eigvecs / torch.sqrt(eigvals + eps)[:, None]).reshape(c * k * k, c, k, k)
    return torch.cat((w, -w)).float()


class Airbench(nn.Module):
    def __init__(self, in_channels=3, num_classes=10, widths=(64, 256, 256), scale=1 / 9):
        super().__init__()
        w0 = 2 * in_channels * 2 * 2
        self.whiten = Conv(in_channels, w0, kernel_size=2, padding=0, bias=True)
        self.whiten.weight.requires_grad = False  # set from data, never trained; its bias is trained
        self.act = nn.GELU()
        self.layers = nn.Sequential(
            ConvGroup(w0, widths[0]), ConvGroup(widths[0], widths[1]), ConvGroup(widths[1], widths[2])
        )
        self.pool = nn.AdaptiveMaxPool2d(1)  # airbench's MaxPool2d(3) on the 3x3 map, for any image size
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        self.scale = scale  # small logits at init; airbench's tuned LRs assume it

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, eps: float = 5e-4):
        """Set the whitening conv from normalized training images [N, C, H, W] (airbench uses 5000)."""
        self.whiten.weight.copy_(whitening_weights(images.detach().cpu(), eps))

    def forward(self, x):
        x = self.layers(self.act(self.whiten(x)))
        return self.head(torch.flatten(self.pool(x), 1)) * self.scale


@register("airbench")
def airbench(in_channels, num_classes, image_size):
    if image_size < 9:  # the 2x2 conv and three 2x pools must leave at least one pixel
        raise UserError(f"airbench needs images of at least 9x9 pixels, got {image_size}")
    return Airbench(in_channels, num_classes)


def tta_logits(model: nn.Module, x: torch.Tensor, level: int) -> torch.Tensor:
    """Test-time augmentation as airbench94's infer: 0 = plain, 1 = mean with the mirror image,
    2 = half that, half the mirrored views translated by one pixel up-left and down-right."""
    if level == 0:
        return model(x)
    mirror = lambda v: 0.5 * model(v) + 0.5 * model(v.flip(-1))
    if level == 1:
        return mirror(x)
    if level == 2:
        h, w = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        shifted = [mirror(padded[..., :h, :w]), mirror(padded[..., 2:, 2:])]
        return 0.5 * mirror(x) + 0.25 * shifted[0] + 0.25 * shifted[1]
    raise UserError(f"TTA level must be 0, 1 or 2, got {level}")
