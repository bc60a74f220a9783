"""Datasets as uint8 image tensors plus int64 labels in memory.

Normalization and augmentation happen elsewhere, on whole batches. Formats read here: torchvision's
CIFAR pickles, the original Fashion-MNIST IDX files, image folders (decoded once into a cache) and a
generated synthetic set that needs no files at all.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import pickle
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .config import DataConfig
from .errors import UserError

FASHION_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Bag", "Sneaker", "Ankle boot"]
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
CACHE_VERSION = 1  # bump when the decoding changes, so old caches are not reused


@dataclass
class Dataset:
    name: str
    classes: list[str]
    train_x: torch.Tensor  # uint8 [N, C, H, W], contiguous
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor   # uint8 [M, C, H, W]
    test_y: torch.Tensor   # int64 [M]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return self.train_x.shape[1]

    @property
    def image_size(self) -> int:
        return self.train_x.shape[2]


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _tensors(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    # np.array copies: IDX arrays are read-only views of the file's bytes
    return torch.from_numpy(np.array(x, dtype=np.uint8, order="C")), torch.as_tensor(np.asarray(y), dtype=torch.int64)


def _check_labels(where: str, y: torch.Tensor, num_classes: int) -> None:
    if len(y) and not 0 <= int(y.min()) <= int(y.max()) < num_classes:
        raise UserError(f"{where}: labels must be in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")


# ----------------------------------------------------------------------------- CIFAR

CIFAR = {  # name, folder, train files, test files, meta file, class-names key, labels key, torchvision class
    "cifar10": ("CIFAR-10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", "label_names", "labels", "CIFAR10"),
    "cifar100": ("CIFAR-100", "cifar-100-python", ["train"], ["test"], "meta", "fine_label_names",
                 "fine_labels", "CIFAR100"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles; allow only what numpy arrays need, so a bad file can't run code."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
        (m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                         "numpy._core.numeric") for n in ("_reconstruct", "scalar", "_frombuffer")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(f, encoding="latin1").load()  # latin1: the batches are Python 2 pickles
        # Python 2 pickles give str keys and names, Python 3 ones bytes: compare as str.
        return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}
    except Exception as e:
        raise UserError(f"{path}: not a CIFAR pickle ({_one_line(e)})") from None


def _read_cifar_batches(folder: Path, files: list[str], labels_key: str):
    xs, ys = [], []
    for name in files:
        d = _unpickle(folder / name)
        x = np.asarray(d.get("data"))
        y = np.asarray(d.get(labels_key, []))
        if x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
            raise UserError(f"{folder / name}: expected 'data' [N, 3072] and N {labels_key!r}, "
                            f"got {x.shape} and {len(y)}")
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(y)
    return _tensors(np.concatenate(xs), np.concatenate(ys))


def _download_cifar(cfg: DataConfig, spec) -> None:
    import torchvision.datasets
    title, cls = spec[0], getattr(torchvision.datasets, spec[7])
    try:  # torchvision prints progress to stdout/stderr; the CLI only wants our one line
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cls(cfg.data_dir, train=True, download=True)
    except Exception as e:
        raise UserError(f"{title} not found under {cfg.data_dir.rstrip("/")}/ and could not be downloaded ({_one_line(e)}); "
                        f"point --data-dir at a folder holding {spec[1]}, or use --dataset synthetic") from None


def _load_cifar(cfg: DataConfig) -> Dataset:
    spec = CIFAR[cfg.dataset]
    title, folder_name, train_files, test_files, meta_file, names_key, labels_key, _ = spec
    folder = Path(cfg.data_dir) / folder_name
    missing = [n for n in train_files + test_files + [meta_file] if not (folder / n).is_file()]
    if missing and cfg.download:
        _download_cifar(cfg, spec)
    elif missing:
        raise UserError(f"{title} not found under {cfg.data_dir.rstrip("/")}/ (no {folder_name}/{missing[0]}) and --no-download "
                        f"is set; point --data-dir at a folder holding {folder_name}, or use --dataset synthetic")
    # Read the pickles ourselves rather than through torchvision: same format, but no md5 check against
    # the official files, so re-packed or subset batches load too.
    names = _unpickle(folder / meta_file).get(names_key)
    if not isinstance(names, list) or not names:
        raise UserError(f"{folder / meta_file}: no {names_key!r} list of class names")
    classes = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
    train_x, train_y = _read_cifar_batches(folder, train_files, labels_key)
    test_x, test_y = _read_cifar_batches(folder, test_files, labels_key)
    _check_labels(str(folder), torch.cat([train_y, test_y]), len(classes))
    return Dataset(cfg.dataset, classes, train_x, train_y, test_x, test_y)


# ----------------------------------------------------------------------------- Fashion-MNIST

def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes: 0, 0, type 0x08, ndim, then ndim big-endian uint32 sizes, then data."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read ({_one_line(e)})") from None
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x800 + ndim:
        raise UserError(f"{path}: not an IDX file of {ndim}-d unsigned bytes "
                        f"(magic number 0x{magic:08x}, expected 0x{0x800 + ndim:08x})")
    dims = np.frombuffer(raw, ">u4", ndim, offset=4).astype(np.int64) if len(raw) >= 4 + 4 * ndim else []
    header = 4 + 4 * ndim
    if len(dims) != ndim or len(raw) != header + int(np.prod(dims)):
        raise UserError(f"{path}: {len(raw)} bytes do not match the IDX header's sizes {list(map(int, dims))}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _find_fashion(cfg: DataConfig) -> dict[str, Path]:
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    dirs = [Path(cfg.data_dir), Path(cfg.data_dir) / "FashionMNIST" / "raw", Path(FASHION_SYSTEM_DIR)]
    for d in dirs:
        found = {n: p for n in names for p in (d / n, d / f"{n}.gz") if p.is_file()}
        if len(found) == len(names):
            return found
    raise UserError(f"Fashion-MNIST not found in {', '.join(map(str, dirs))}; point --data-dir at a folder "
                    f"holding {names[0]}[.gz] and the other IDX files (Debian: apt-get install dataset-fashion-mnist)")


def _load_fashion(cfg: DataConfig) -> Dataset:
    files = _find_fashion(cfg)
    splits = []
    for split in ("train", "t10k"):
        x = _read_idx(files[f"{split}-images-idx3-ubyte"], 3)
        y = _read_idx(files[f"{split}-labels-idx1-ubyte"], 1)
        if len(x) != len(y):
            raise UserError(f"Fashion-MNIST {split}: {len(x)} images but {len(y)} labels")
        splits.append(_tensors(x[:, None], y))
        _check_labels(str(files[f"{split}-labels-idx1-ubyte"]), splits[-1][1], len(FASHION_CLASSES))
    return Dataset(cfg.dataset, list(FASHION_CLASSES), *splits[0], *splits[1])


# ----------------------------------------------------------------------------- image folders

def _scan(root: str, split: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted subfolders) and (file, label) pairs in a stable order. Plain strings, not
    Path objects: this runs over every file on every start, so it must stay well under a second."""
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise UserError(f"imagefolder: {split_dir} not found; --data-dir must hold train/<class>/ and test/<class>/")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    items = []
    for label, c in enumerate(classes):
        d = os.path.join(split_dir, c)
        files = sorted(e.name for e in os.scandir(d) if e.is_file() and not e.name.startswith(".")
                       and os.path.splitext(e.name)[1].lower() in IMAGE_EXTS)
        if not files and split == "train":
            raise UserError(f"imagefolder: {d} holds no images ({' '.join(sorted(IMAGE_EXTS))})")
        items += [(os.path.join(d, f), label) for f in files]
    if not items:
        raise UserError(f"imagefolder: {split_dir} holds no class folders with images")
    return classes, items


def _cache_key(root: str, items: list[tuple[str, int]], image_size: int) -> str:
    """Changes whenever a file is added, removed, renamed or rewritten, or the target size changes."""
    lines = [f"v{CACHE_VERSION} size={image_size}\n"]
    for path, label in items:
        st = os.stat(path)
        lines.append(f"{path[len(root):]}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n")
    return hashlib.sha256("".join(lines).encode("utf-8", "surrogateescape")).hexdigest()[:20]


def _cache_paths(root: str, key: str) -> list[Path]:
    """Next to the data when it is writable, else the user's cache (the shared data dir may be read-only)."""
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dist_cnn"
    where = hashlib.sha256(os.path.realpath(root).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return [d / f"imagefolder-{where}-{key}.pt" for d in (Path(root) / ".dist_cnn_cache", user)]


def _decode(path: str, size: int) -> torch.Tensor:
    """One image file -> uint8 [3, size, size]."""
    try:  # torchvision.io is ~4x faster than PIL on small JPEGs (deprecated in 0.29, hence optional)
        from torchvision.io import ImageReadMode, decode_image, read_file
        img = decode_image(read_file(path), mode=ImageReadMode.RGB)
    except Exception:
        img = None
    if img is None or img.dtype != torch.uint8 or img.ndim != 3:  # e.g. BMP, TIFF, 16-bit PNG
        try:
            with Image.open(path) as im:
                img = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)
        except Exception as e:
            raise UserError(f"imagefolder: cannot decode image {path} ({_one_line(e)})") from None
    if img.shape[1:] != (size, size):  # stretch to a square, as Resize((size, size)) would
        img = F.interpolate(img[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        img = img[0].round().clamp(0, 255).to(torch.uint8)
    return img


def _decode_all(paths: list[str], size: int) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision.io's, once per image
        return torch.stack([_decode(p, size) for p in paths])


def _load_cache(path: Path, log) -> dict | None:
    try:
        data = torch.load(path, weights_only=True)  # tensors, lists and strings only: nothing to execute
        assert {"classes", "train_x", "train_y", "test_x", "test_y"} <= set(data)
        return data
    except Exception as e:  # a truncated or foreign file: decode again
        log(f"ignoring unreadable cache {path} ({_one_line(e)})")
        return None


def _save_cache(data: dict, paths: list[Path], log) -> None:
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
            try:
                with os.fdopen(fd, "wb") as f:
                    torch.save(data, f)
                os.chmod(tmp, 0o644)  # mkstemp makes it private; others sharing the data dir may read it
                os.replace(tmp, path)  # readers see the old file or the whole new one, never half
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except (OSError, RuntimeError):  # read-only or full disk: try the next place
            continue
        for stale in path.parent.glob(path.name.rsplit("-", 1)[0] + "-*.pt"):  # older versions of this folder
            if stale != path:
                stale.unlink(missing_ok=True)
        return
    log(f"could not write the image cache to {' or '.join(str(p.parent) for p in paths)}; decoding again next time")


def _load_imagefolder(cfg: DataConfig, log) -> Dataset:
    root = os.path.normpath(cfg.data_dir)
    if not os.path.isdir(root):
        raise UserError(f"imagefolder: data directory {root} not found; set --data-dir to a folder with train/ and test/")
    classes, train = _scan(root, "train")
    test_classes, test = _scan(root, "test")
    if test_classes != classes:
        raise UserError(f"imagefolder: train/ and test/ class folders differ ({sorted(set(classes) ^ set(test_classes))})")
    paths = _cache_paths(root, _cache_key(root, train + test, cfg.image_size))
    data = next((d for p in paths if p.is_file() and (d := _load_cache(p, log)) is not None), None)
    if data is None:
        log(f"decoding {len(train) + len(test)} images from {root} into the cache (once) ...")
        data = {"classes": classes}
        for split, items in (("train", train), ("test", test)):
            data[f"{split}_x"] = _decode_all([p for p, _ in items], cfg.image_size)
            data[f"{split}_y"] = torch.tensor([y for _, y in items], dtype=torch.int64)
        _save_cache(data, paths, log)
    return Dataset(cfg.dataset, list(data["classes"]), data["train_x"], data["train_y"], data["test_x"], data["test_y"])


# ----------------------------------------------------------------------------- synthetic

def _synthetic_split(templates: torch.Tensor, n: int, seed: int):
    """Each image: its class's template at a random contrast (some nearly invisible), a random colour cast
    and heavy noise, so a small CNN learns it within an epoch but not perfectly."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randperm(n, generator=g) % len(templates)  # balanced classes in random order
    contrast = 0.05 + 0.95 * torch.rand(n, 1, 1, 1, generator=g)
    cast = 50 * (torch.rand(n, 3, 1, 1, generator=g) * 2 - 1)
    x = torch.randn(n, 3, 32, 32, generator=g).mul_(70).add_(80 * contrast * templates[y] + cast + 128)
    return x.round_().clamp_(0, 255).to(torch.uint8), y


def _load_synthetic(cfg: DataConfig) -> Dataset:
    # Own generators with constant seeds: the same data whatever the global RNG or the sizes asked for.
    g = torch.Generator().manual_seed(1234)
    templates = F.interpolate(torch.rand(10, 3, 4, 4, generator=g) * 2 - 1, size=(32, 32), mode="bicubic",
                              align_corners=False)  # smooth, low-frequency colour patterns
    return Dataset("synthetic", [f"class{i}" for i in range(10)], *_synthetic_split(templates, cfg.synthetic_train_size, 1),
                   *_synthetic_split(templates, cfg.synthetic_test_size, 2))


def load_dataset(cfg: DataConfig, log: Callable[[str], None] | None = None) -> Dataset:
    """The dataset cfg names, fully in memory. log receives the odd one-line note (e.g. a first-time decode)."""
    log = log or (lambda msg: None)
    if cfg.dataset in CIFAR:
        return _load_cifar(cfg)
    if cfg.dataset == "fashion-mnist":
        return _load_fashion(cfg)
    if cfg.dataset == "imagefolder":
        return _load_imagefolder(cfg, log)
    if cfg.dataset == "synthetic":
        return _load_synthetic(cfg)
    raise UserError(f"--dataset: unknown dataset {cfg.dataset!r}")
