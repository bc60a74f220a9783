"""A trained model ready for inference: weights, normalization, class names and the run's preprocessing.

Reads a run's `model.pt` or any checkpoint (`step-N.pt`, `best.pt`) with weights_only=True, rebuilds
the architecture from the registry, and turns image files into the tensors the run was evaluated on:
decoded to RGB (or grayscale for one-channel models), resized the way the run's data was prepared,
then normalized with the run's mean/std.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from dist_cnn.config import DataConfig
from dist_cnn.data.datasets import IMAGE_EXTS, load_dataset
from dist_cnn.data.loader import Normalize, normalization_stats
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

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def eval_crop_ratio(self) -> float | None:
        """Set by runs whose evaluation resizes to image_size/ratio and center-crops (streamed data)."""
        ratio = self.config.get("data", {}).get("eval_crop_ratio")
        return float(ratio) if isinstance(ratio, (int, float)) and 0 < ratio < 1 else None

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
        ratio = self.eval_crop_ratio
        resize = (
            f"resize the shorter side to round({self.image_size} / {ratio}), center-crop "
            f"{self.image_size}x{self.image_size}"
            if ratio
            else f"resize to {self.image_size}x{self.image_size} (bilinear, antialiased)"
        )
        colour = {3: "RGB", 1: "grayscale"}.get(self.in_channels, f"{self.in_channels}-channel")
        return {
            "model": self.name,
            "classes": self.classes,
            "num_classes": self.num_classes,
            "in_channels": self.in_channels,
            "image_size": self.image_size,
            "mean": self.mean,
            "std": self.std,
            "eval_crop_ratio": ratio,
            "input": f"float32 [N, {self.in_channels}, {self.image_size}, {self.image_size}], {colour}; "
            f"{resize}; scale to [0, 1], then (x - mean) / std per channel",
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
    mean, std = normalization_stats(data.train_x, cfg.normalize)
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
        model.load_state_dict(state["model"])
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


def decode(path: str, channels: int) -> torch.Tensor:
    """One file -> uint8 [channels, H, W]: grayscale, palette, RGBA and CMYK become RGB (or gray),
    exactly as the image-folder loader decodes training data. Raises ValueError if unreadable."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision.io's
            img = decode_image(read_file(path), mode=mode)
    except Exception:
        img = None
    if img is None or img.dtype != torch.uint8 or img.ndim != 3:  # e.g. BMP, TIFF, 16-bit PNG
        try:
            with Image.open(path) as im:
                arr = np.array(im.convert("RGB" if channels == 3 else "L"))
        except Exception as e:
            text = " ".join(str(e).split())[:200] or type(e).__name__
            raise ValueError(f"cannot decode image ({text})") from None
        img = torch.from_numpy(arr).permute(2, 0, 1) if arr.ndim == 3 else torch.from_numpy(arr)[None]
    if img.shape[0] != channels:
        raise ValueError(f"decoded to {img.shape[0]} channels, the model takes {channels}")
    return img.contiguous()


def resize(img: torch.Tensor, size: int, crop_ratio: float | None) -> torch.Tensor:
    """uint8 [C, H, W] -> uint8 [C, size, size] the way the run's evaluation data was prepared."""
    if crop_ratio:  # Resize(size / ratio) of the shorter side, then CenterCrop(size)
        from torchvision.transforms.v2 import functional as TF

        img = TF.resize(img, [round(size / crop_ratio)], antialias=True)
        return TF.center_crop(img, [size, size])
    if img.shape[1:] != (size, size):  # the image-folder loader's square resize (dist_cnn.data.datasets)
        img = F.interpolate(img[None].float(), size=(size, size), mode="bilinear", antialias=True)
        img = img[0].round().clamp(0, 255).to(torch.uint8)
    return img


def load_image(path: str, im: InferenceModel) -> torch.Tensor:
    return resize(decode(path, im.in_channels), im.image_size, im.eval_crop_ratio)


@torch.no_grad()
def logits(
    im: InferenceModel, model: nn.Module, batch: torch.Tensor, normalize: Normalize, tta: int | None = None
) -> torch.Tensor:
    """uint8 batch [N, C, S, S] on the model's device -> float32 logits, with the run's test-time
    augmentation unless tta is given."""
    return tta_logits(model, normalize(batch), im.tta if tta is None else tta).float()
