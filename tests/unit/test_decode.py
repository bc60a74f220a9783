"""The one decoder (dist_cnn.data.decode) on real files: every colour mode, 16-bit scaling, the pixel
limit read from the header, one-line errors; and the one evaluation transform."""

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from dist_cnn.data.decode import clean_error, decode, read_file
from dist_cnn.data.source import Recipe
from dist_cnn.data.transform import eval_transform
from dist_cnn.errors import UserError


def png(path, width, height, depth, colour, rows: bytes | None = None) -> None:
    """A PNG written by hand: any header (e.g. 30000 x 30000 pixels in a few bytes), optional pixels."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    body = chunk(b"IDAT", zlib.compress(rows)) if rows is not None else chunk(b"IDAT", zlib.compress(b"\0" * 64))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + body + chunk(b"IEND", b""))


def test_every_colour_mode_becomes_rgb(tmp_path):
    rgb = np.random.default_rng(1).integers(0, 256, (12, 10, 3), dtype=np.uint8)
    im = Image.fromarray(rgb)
    files = {
        "gray.jpg": im.convert("L"),
        "cmyk.jpg": im.convert("CMYK"),
        "rgba.png": im.convert("RGBA"),
        "la.png": im.convert("LA"),
        "pal.png": im.convert("P"),
        "pal.gif": im.convert("P"),
        "x.bmp": im,
        "x.tiff": im.convert("CMYK"),
        "x.webp": im,
    }
    for name, img in files.items():
        img.save(tmp_path / name)
        x = read_file(str(tmp_path / name))
        assert x.shape == (3, 12, 10) and x.dtype == torch.uint8, name
        assert read_file(str(tmp_path / name), channels=1).shape == (1, 12, 10), name
    assert torch.equal(read_file(str(tmp_path / "rgba.png")), torch.from_numpy(rgb).permute(2, 0, 1))
    assert torch.equal(read_file(str(tmp_path / "x.bmp")), torch.from_numpy(rgb).permute(2, 0, 1))


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    gray = np.full((20, 30), 32767, dtype=np.uint16)
    gray[:, :10] = 65535
    Image.fromarray(gray).save(tmp_path / "gray16.png")  # PIL mode I;16
    x = read_file(str(tmp_path / "gray16.png"))
    assert x.shape == (3, 20, 30) and int(x[0, 0, 20]) == 127 and int(x[0, 0, 0]) == 255
    assert abs(x[:, :, 10:].float().mean().item() - 127) < 1
    rgb16 = np.zeros((4, 6, 3), dtype=">u2")
    rgb16[..., 0], rgb16[..., 1], rgb16[..., 2] = 65535, 32767, 256
    rows = b"".join(b"\0" + r.tobytes() for r in rgb16)
    png(tmp_path / "rgb16.png", 6, 4, 16, 2, rows)  # 16-bit RGB
    x = read_file(str(tmp_path / "rgb16.png"))
    assert x[:, 0, 0].tolist() == [255, 127, 1]
    Image.fromarray(gray.astype(np.int32), "I").save(tmp_path / "gray32.tiff")  # PIL's path: mode I
    assert int(read_file(str(tmp_path / "gray32.tiff"))[0, 0, 20]) == 127


def test_pixel_limit_from_the_header_before_decoding(tmp_path):
    png(tmp_path / "huge.png", 30000, 30000, 8, 2)  # ~100 bytes declaring 900 M pixels
    with pytest.raises(UserError) as e:
        read_file(str(tmp_path / "huge.png"))
    msg = str(e.value)
    assert "huge.png" in msg and "30000x30000" in msg and "--max-image-pixels" in msg and "\n" not in msg
    Image.new("RGB", (40, 30)).save(tmp_path / "small.png")
    assert read_file(str(tmp_path / "small.png"), max_pixels=1200).shape == (3, 30, 40)
    with pytest.raises(UserError, match="1200 pixels, more than --max-image-pixels 1199"):
        read_file(str(tmp_path / "small.png"), max_pixels=1199)
    assert read_file(str(tmp_path / "small.png"), max_pixels=0).shape == (3, 30, 40)  # 0: no limit


def test_bad_files_are_one_line_without_cpp_frames(tmp_path):
    Image.new("RGB", (64, 48), (10, 20, 30)).save(tmp_path / "ok.jpg")
    good = (tmp_path / "ok.jpg").read_bytes()
    cases = {"empty.jpg": b"", "truncated.jpg": good[: len(good) // 3], "text.jpg": b"not an image at all"}
    for name, raw in cases.items():
        with pytest.raises(UserError) as e:
            decode(raw, name)
        msg = str(e.value)
        assert name in msg and "\n" not in msg and "Exception raised" not in msg and "frame #" not in msg, msg
    frames = RuntimeError(
        "DefaultCPUAllocator: can't allocate memory: you tried to allocate 3600000000 bytes.\n"
        "Exception raised from allocate at /pytorch/c10/core/impl/alloc_cpu.cpp:117 (most recent call first):\n"
        "frame #0: c10::Error::Error(...) + 0x96 (0x7f in libc10.so)\nframe #1: ..."
    )
    assert clean_error(frames) == "DefaultCPUAllocator: can't allocate memory: you tried to allocate 3600000000 bytes."


def test_the_evaluation_transform():
    img = torch.randint(0, 256, (3, 48, 40), dtype=torch.uint8)
    same = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    assert eval_transform(same, Recipe(32)) is same  # stretch: nothing to do at the size
    assert eval_transform(img, Recipe(32)).shape == (3, 32, 32)
    crop = Recipe(32, eval_resize="center-crop", eval_crop_ratio=0.875)
    assert crop.shorter_side == 36  # floor(32 / 0.875), as torchvision's reference and timm
    from torchvision.transforms import v2

    reference = v2.Compose([v2.Resize(36, antialias=True), v2.CenterCrop(32)])(img)
    assert torch.equal(eval_transform(img, crop), reference)
