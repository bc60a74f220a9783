"""A trained model ready for inference: weights, normalization, class names and the run's preprocessing.

Reads a run's `model.pt` or any checkpoint (`step-N.pt`, `best.pt`) with weights_only=True, rebuilds
the architecture from the registry, and turns image files into the tensors the run was evaluated on:
decoded to RGB (or grayscale for one-channel models), resized the way the run's data was prepared,
then normalized with the run's mean/std.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from dist_cnn.config import DataConfig
from dist_cnn.data.datasets import IMAGE_EXTS, load_dataset
from dist_cnn.data.decode import read_file
from dist_cnn.data.loader import Normalize
from dist_cnn.data.source import DEFAULT_MAX_IMAGE_PIXELS, Recipe, upgrade_stored_config
from dist_cnn.data.transform import eval_transform
from dist_cnn.errors import UserError, one_line
from dist_cnn.models.checks import select_output
from dist_cnn.models.registry import build_model, tta_logits
from dist_cnn.models.trust import check_file_spec
from dist_cnn.train import checkpoint


@dataclass
class InferenceModel:
    model: nn.Module  # eval mode, on the CPU, float32, contiguous memory format
    name: str
    classes: list[str]
    in_channels: int
    image_size: int
    mean: list[float]
    std: list[float]
    config: dict = field(default_factory=dict)  # the run's config.json, as stored
    loader: str = ""  # the pipeline the run trained with (older runs' recipe followed it)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def recipe(self) -> Recipe:
        """The run's evaluation transform (source.Recipe), which predict and exports apply."""
        data = upgrade_stored_config(dict(self.config.get("data", {}) or {}), self.loader)
        ratio, pixels = data.get("eval_crop_ratio", 0.875), data.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS)
        ratio = float(ratio) if isinstance(ratio, (int, float)) and 0 < ratio <= 1 else 0.875
        resize = data.get("eval_resize") if data.get("eval_resize") in ("stretch", "center-crop") else "stretch"
        pixels = int(pixels) if isinstance(pixels, int) and pixels >= 0 else DEFAULT_MAX_IMAGE_PIXELS
        return Recipe(self.image_size, eval_resize=resize, eval_crop_ratio=ratio, max_pixels=pixels)

    @property
    def eval_crop_ratio(self) -> float | None:
        """The centre crop's ratio for runs that evaluate resize + centre crop, else None."""
        recipe = self.recipe
        return recipe.eval_crop_ratio if recipe.eval_resize == "center-crop" else None

    @property
    def tta(self) -> int:
        return int(self.config.get("train", {}).get("tta", 0) or 0)

    @property
    def channels_last(self) -> bool:
        return bool(self.config.get("model", {}).get("channels_last", False))

    def normalizer(self, device) -> Normalize:
        return Normalize(self.mean, self.std, device, self.channels_last)

    def metadata(self) -> dict:
        """What a consumer of an exported model needs besides the weights."""
        recipe = self.recipe
        colour = {3: "RGB", 1: "grayscale"}.get(self.in_channels, f"{self.in_channels}-channel")
        return {
            "model": self.name,
            "classes": self.classes,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "mean": self.mean,
            "std": self.std,
            "eval_resize": recipe.eval_resize,
            "eval_crop_ratio": self.eval_crop_ratio,
            "input": f"float32 [N, {self.in_channels}, {self.image_size}, {self.image_size}], {colour}; "
            f"{recipe.describe()}; scale to [0, 1], then (x - mean) / std per channel",
            "output": f"logits [N, {self.num_classes}] in class order; softmax for probabilities",
        }


def _raw_config(state: dict) -> dict:
    cfg = state.get("config")
    return cfg if isinstance(cfg, dict) else {}


def _from_dataset(state: dict, path: Path) -> dict:
    """Older checkpoints lack class names and normalization: take them from the run's dataset."""
    stored = _raw_config(state).get("data", {})
    known = {k: v for k, v in stored.items() if k in DataConfig.__dataclass_fields__}
    cfg = DataConfig(**{**known, "download": False})
    try:
        data = load_dataset(cfg)
    except UserError as e:
        raise UserError(
            f"{path} holds no class names or normalization and its dataset is not readable "
            f"here ({e}); use the run's model.pt instead"
        ) from None
    mean, std = data.normalization(cfg.normalize)
    return {
        "classes": data.classes,
        "in_channels": data.in_channels,
        "image_size": data.image_size,
        "mean": mean,
        "std": std,
    }


def load_model(path: str | Path, *, model: str | None = None, trust_model_code: bool = False) -> InferenceModel:
    """A run's model.pt or a training checkpoint, rebuilt on the CPU in eval mode. A spec that imports
    the user's own code is built only when `model` names it or `trust_model_code` is set (trust.py)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory; give its model.pt or a checkpoint file")
    state = checkpoint.load(path)
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise UserError(f"{path} is not a dist_cnn model.pt or checkpoint (no model weights)")
    cfg = _raw_config(state)
    name = state.get("model_name") or cfg.get("model", {}).get("name")
    if not name:
        raise UserError(f"{path} does not say which model it holds (no model_name or config)")
    check_file_spec(name, str(path), named=model, trust=trust_model_code)
    info = {k: state[k] for k in ("classes", "in_channels", "image_size", "mean", "std") if k in state}
    if len(info) < 5:
        info = _from_dataset(state, path)
    model = build_model(name, int(info["in_channels"]), len(info["classes"]), int(info["image_size"]))
    try:
        checkpoint.restore(state, {"model": model})
    except RuntimeError as e:
        raise UserError(
            f"{path}: the weights do not fit a {name} model with {len(info['classes'])} classes ({one_line(e)[:200]})"
        ) from None
    key = cfg.get("model", {}).get("output_key", "")
    select_output(model, key if isinstance(key, str) else "")
    model.eval()
    return InferenceModel(
        model,
        name,
        [str(c) for c in info["classes"]],
        int(info["in_channels"]),
        int(info["image_size"]),
        [float(v) for v in info["mean"]],
        [float(v) for v in info["std"]],
        cfg,
        str(state.get("loader") or ""),
    )


# ----------------------------------------------------------------------------- image files


def list_images(paths) -> list[str]:
    """Files as given and image files under folders (recursively, sorted), each once, in order."""
    out, seen = [], set()

    def add(p: str):
        if p not in seen:
            seen.add(p)
            out.append(p)

    for p in map(str, paths):
        if os.path.isdir(p):
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for f in sorted(files):
                    if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTS:
                        add(os.path.join(root, f))
        elif os.path.exists(p):
            add(p)
        else:
            raise UserError(f"no such file or folder: {p}")
    if not out:
        raise UserError(f"no image files ({' '.join(sorted(IMAGE_EXTS))}) in {' '.join(map(str, paths))}")
    return out


def load_decoders() -> None:
    """Import torchvision's decoders and transforms now (seconds on a busy machine). Every command
    imports this module; only the ones that read image files pay for torchvision."""
    import torchvision.io  # noqa: F401
    import torchvision.transforms.v2.functional  # noqa: F401


def load_image(path: str, im: InferenceModel, max_pixels: int | None = None) -> torch.Tensor:
    """One image file -> uint8 [C, S, S] as the run's evaluation prepared its test images (the one
    decoder and the one evaluation transform). Raises UserError naming the file when unreadable."""
    recipe = im.recipe
    pixels = recipe.max_pixels if max_pixels is None else max_pixels
    return eval_transform(read_file(path, pixels, im.in_channels), recipe)


@torch.no_grad()
def logits(
    im: InferenceModel, model: nn.Module, batch: torch.Tensor, normalize: Normalize, tta: int | None = None
) -> torch.Tensor:
    """uint8 batch [N, C, S, S] on the model's device -> float32 logits, with the run's test-time
    augmentation unless tta is given."""
    return tta_logits(model, normalize(batch), im.tta if tta is None else tta).float()
