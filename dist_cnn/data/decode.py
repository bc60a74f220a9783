"""The one image decoder: encoded bytes -> uint8 [C, H, W], for training, evaluation and predict.

- The pixel count is read from the header (PIL opens lazily) and checked against a limit before any
  pixel is decoded: a small file can declare 30000 x 30000 pixels (3.4 GB decoded).
- torchvision's decoders (JPEG, PNG, WebP, GIF) do the work; grayscale, CMYK, RGBA, LA and palette
  images become RGB (or grayscale for one-channel models); PIL decodes what torchvision does not
  (BMP, TIFF, PPM, animated GIF's first frame, ...).
- 16-bit images are scaled to 8 bits (v >> 8, torchvision's to_dtype), never clipped.
- Every failure is a UserError of one line naming the sample, without the C++ frames torchvision's
  errors carry.
"""

from __future__ import annotations

import io
import re
import warnings

import numpy as np
import torch
from PIL import Image

from dist_cnn.data.source import DEFAULT_MAX_IMAGE_PIXELS
from dist_cnn.errors import UserError

_WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535}


def clean_error(e: BaseException) -> str:
    """The first line of a decoder's message, without C++ frames or torchvision's source location."""
    text = str(e).split("Exception raised from", 1)[0]
    line = next((s.strip() for s in text.splitlines() if s.strip()), "") or type(e).__name__
    if line.startswith("decode_") or " at /" in line:  # "decode_jpeg: ... at /src/...: message"
        line = line.rsplit(": ", 1)[-1] if ": " in line else line
        line = line.rsplit(", ", 1)[-1]
    return re.sub(r"\s+", " ", line)[:200]


def image_size_of(raw: bytes, name: str) -> tuple[int, int, str]:
    """(width, height, PIL mode) from the header alone."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # our limit, with our message, is checked by the caller
    try:
        with Image.open(io.BytesIO(raw)) as im:
            return im.size[0], im.size[1], im.mode
    except Exception as e:
        raise UserError(f"cannot decode image {name} ({clean_error(e)})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def check_pixels(width: int, height: int, name: str, max_pixels: int) -> None:
    if max_pixels and width * height > max_pixels:
        raise UserError(
            f"image {name} is {width}x{height} = {width * height} pixels, more than --max-image-pixels "
            f"{max_pixels}: shrink it, remove it, or raise the limit"
        )


def decode(raw: bytes, name: str, channels: int = 3, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> torch.Tensor:
    """Encoded image bytes -> uint8 [channels, H, W] (channels 3: RGB, 1: grayscale)."""
    if not raw:
        raise UserError(f"cannot decode image {name} (empty file)")
    width, height, mode = image_size_of(raw, name)
    check_pixels(width, height, name, max_pixels)
    try:
        img = _torchvision(raw, channels)
        if img is None:
            img = _pil(raw, channels, mode)
    except UserError:
        raise
    except Exception as e:  # MemoryError, RuntimeError with C++ frames, PIL's errors
        raise UserError(f"cannot decode image {name} ({clean_error(e)})") from None
    if img.shape[0] != channels:
        raise UserError(f"cannot decode image {name} (decoded to {img.shape[0]} channels, expected {channels})")
    return img.contiguous()


def _torchvision(raw: bytes, channels: int) -> torch.Tensor | None:
    """torchvision's decoders; None for what they do not read (then PIL)."""
    from torchvision.io import ImageReadMode, decode_image  # imported on first use: seconds on a busy machine

    mode = ImageReadMode.RGB if channels == 3 else ImageReadMode.GRAY
    try:
        with warnings.catch_warnings():  # deprecated in favour of torchcodec, but the fastest CPU decoders here
            warnings.simplefilter("ignore", DeprecationWarning)
            img = decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=mode)
    except RuntimeError as e:
        if "truncated" in str(e) or "corrupt" in str(e).lower():
            raise UserError(clean_error(e)) from None  # named by the caller's handler
        return None
    if img.ndim != 3 or img.shape[0] != channels:  # animated GIFs; GIF ignores the mode
        return None
    if img.dtype == torch.uint16:  # 16-bit PNG
        from torchvision.transforms.v2.functional import to_dtype

        return to_dtype(img, torch.uint8, scale=True)
    return img if img.dtype == torch.uint8 else None


def _pil(raw: bytes, channels: int, mode: str) -> torch.Tensor:
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # already checked against our limit
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if mode in _WIDE_MODES:  # 16-bit gray: PIL's convert would clip to 255, not scale
                arr = np.asarray(im, dtype=np.int64)
                gray = (np.clip(arr, 0, 65535) >> 8).astype(np.uint8)
                im8 = Image.fromarray(gray, "L")
            else:
                im8 = im
            arr = np.array(im8.convert("RGB" if channels == 3 else "L"))
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return torch.from_numpy(arr).permute(2, 0, 1) if arr.ndim == 3 else torch.from_numpy(arr)[None]


def read_file(path: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, channels: int = 3) -> torch.Tensor:
    """One image file -> uint8 [channels, H, W]; UserError naming the file when unreadable."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e})") from None
    return decode(raw, path, channels, max_pixels)
