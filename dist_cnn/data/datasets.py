"""Datasets as uint8 image tensors plus int64 labels, all in memory.

Normalization and augmentation happen elsewhere, on whole batches. Read here: CIFAR-10/100 pickles
(torchvision's on-disk format), Fashion-MNIST IDX files, image folders (decoded once into a cache),
and a generated synthetic set that needs no files at all.
"""

from __future__ import annotations

import logging
import contextlib
import gzip
import hashlib
import io
import os
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dist_cnn.config import DataConfig
from dist_cnn.data.decode import read_file
from dist_cnn.data.memory import InMemory
from dist_cnn.data.source import Recipe, recipe_of
from dist_cnn.data.transform import eval_transform
from dist_cnn.errors import UserError, one_line
from dist_cnn.fileio import atomic_write

log = logging.getLogger(__name__)

FASHION_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"  # where Debian's dataset-fashion-mnist puts it
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Bag",
    "Sneaker",
    "Ankle boot",
]
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
CACHE_VERSION = 2  # bump when decoding changes, so no run reuses pixels decoded the old way


Dataset = InMemory  # the name readers and the Python API use


def _tensors(x, y, num_classes: int, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.from_numpy(np.array(y, dtype=np.int64))
    if len(y) and not 0 <= int(y.min()) <= int(y.max()) < num_classes:
        raise UserError(f"{where}: labels must be in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    return torch.from_numpy(np.array(x, dtype=np.uint8, order="C")), y  # a copy: IDX arrays are read-only


# ----------------------------------------------------------------------------- CIFAR

CIFAR = {  # title, folder, train files, test files, meta file, class-names key, labels key
    "cifar10": (
        "CIFAR-10",
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        "label_names",
        "labels",
    ),
    "cifar100": ("CIFAR-100", "cifar-100-python", ["train"], ["test"], "meta", "fine_label_names", "fine_labels"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR batches are pickles: allow only what numpy arrays need, so a planted file can't run code."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {
        (f"numpy.{core}.{mod}", name)
        for core in ("core", "_core")
        for mod in ("multiarray", "numeric")
        for name in ("_reconstruct", "scalar", "_frombuffer")
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _str(s) -> str:  # the official batches are Python 2 pickles: str under latin1, bytes when rewritten by py3
    return s.decode("latin1") if isinstance(s, bytes) else str(s)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return {_str(k): v for k, v in _ArrayUnpickler(f, encoding="latin1").load().items()}
    except Exception as e:
        raise UserError(f"{path}: not a CIFAR pickle ({one_line(e)})") from None


def _read_cifar(folder: Path, files: list[str], labels_key: str, num_classes: int):
    xs, ys = [], []
    for name in files:
        d = _unpickle(folder / name)
        x, y = np.asarray(d.get("data")), np.asarray(d.get(labels_key, []))
        integer_labels = not len(y) or y.dtype.kind in "iu"
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x) or not integer_labels:
            raise UserError(
                f"{folder / name}: expected uint8 'data' [N, 3072] and N integer {labels_key!r}, "
                f"got {x.dtype} {x.shape} and {len(y)} {y.dtype}"
            )
        xs.append(x.reshape(-1, 3, 32, 32))  # each row: the red plane, then green, then blue
        ys.append(y)
    return _tensors(np.concatenate(xs), np.concatenate(ys), num_classes, str(folder))


def _load_cifar(cfg: DataConfig) -> Dataset:
    title, folder_name, train_files, test_files, meta_file, names_key, labels_key = CIFAR[cfg.dataset]
    folder = Path(cfg.data_dir) / folder_name
    missing = [n for n in [meta_file] + train_files + test_files if not (folder / n).is_file()]
    if missing:
        why = f"no {folder_name}/{missing[0]}, and --no-download is set"
        if cfg.download:
            import torchvision.datasets

            try:  # torchvision prints download progress; the CLI wants our one line only
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    getattr(torchvision.datasets, title.replace("-", ""))(cfg.data_dir, download=True)
                why = None
            except Exception as e:
                why = f"could not be downloaded: {one_line(e)}"
        if why:
            raise UserError(
                f"{title} not found under {cfg.data_dir} ({why}); point --data-dir at a folder "
                f"holding {folder_name}, or use --dataset synthetic"
            )
    # Read the pickles ourselves, not through torchvision: the same format, minus its md5 check against
    # the official files, so subset or re-packed batches load too.
    names = _unpickle(folder / meta_file).get(names_key)
    if not isinstance(names, list) or not names:
        raise UserError(f"{folder / meta_file}: no {names_key!r} list of class names")
    classes = [_str(n) for n in names]
    train = _read_cifar(folder, train_files, labels_key, len(classes))
    test = _read_cifar(folder, test_files, labels_key, len(classes))
    return Dataset(cfg.dataset, classes, *train, *test)


# ----------------------------------------------------------------------------- Fashion-MNIST


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """IDX of unsigned bytes: 0, 0, 0x08, ndim, ndim big-endian uint32 sizes, then the data."""
    try:
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    except Exception as e:  # OSError, EOFError, zlib.error
        raise UserError(f"{path}: cannot read ({one_line(e)})") from None
    magic, header = int.from_bytes(raw[:4], "big"), 4 + 4 * ndim
    if magic != 0x800 + ndim:
        raise UserError(
            f"{path}: not an IDX file of {ndim}-d bytes (magic number 0x{magic:08x}, expected 0x{0x800 + ndim:08x})"
        )
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) != header + int(np.prod(dims)):
        raise UserError(f"{path}: {len(raw)} bytes do not match the IDX header's sizes {dims}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _load_fashion(cfg: DataConfig) -> Dataset:
    names = [f"{split}-{kind}" for split in ("train", "t10k") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    dirs = [Path(cfg.data_dir), Path(cfg.data_dir) / "FashionMNIST" / "raw", Path(FASHION_SYSTEM_DIR)]
    for d in dirs:
        files = {n: p for n in names for p in (d / n, d / f"{n}.gz") if p.is_file()}
        if len(files) == len(names):
            break
    else:
        raise UserError(
            f"Fashion-MNIST not found in {', '.join(map(str, dirs))}; point --data-dir at a folder "
            f"holding {names[0]}(.gz) and the other IDX files (Debian: dataset-fashion-mnist)"
        )
    splits = []
    for split in ("train", "t10k"):
        x = _read_idx(files[f"{split}-images-idx3-ubyte"], 3)
        y = _read_idx(files[f"{split}-labels-idx1-ubyte"], 1)
        if len(x) != len(y):
            raise UserError(f"Fashion-MNIST in {d}: {split} has {len(x)} images but {len(y)} labels")
        splits += _tensors(x[:, None], y, len(FASHION_CLASSES), str(files[f"{split}-labels-idx1-ubyte"]))
    return Dataset(cfg.dataset, list(FASHION_CLASSES), *splits)


# ----------------------------------------------------------------------------- image folders


def _entry_is(entry: os.DirEntry, kind: str) -> bool:
    """entry.is_dir() / is_file(), following symlinks; a symlink loop or an unreadable link is one line."""
    try:
        return entry.is_dir() if kind == "dir" else entry.is_file()
    except OSError as e:
        raise UserError(f"imagefolder: {entry.path}: {e.strerror}; fix or remove it") from None


def scan_classes(root: str, split: str) -> tuple[list[str], list[list[str]]]:
    """Class names (sorted subfolders of root/split) and each class's image file names, sorted. Plain
    strings and os.scandir: this runs over every file of a split, millions for ImageNet."""
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
        raise UserError(
            f"imagefolder: {split_dir} not found; --data-dir must hold train/<class>/ and "
            f"{split}/<class>/ (see --test-split)"
        )
    classes = sorted(e.name for e in os.scandir(split_dir) if not e.name.startswith(".") and _entry_is(e, "dir"))
    files = []
    for c in classes:
        d = os.path.join(split_dir, c)
        names = sorted(
            e.name
            for e in os.scandir(d)
            if not e.name.startswith(".")
            and os.path.splitext(e.name)[1].lower() in IMAGE_EXTS
            and _entry_is(e, "file")
        )
        if not names and split == "train":
            raise UserError(f"imagefolder: {d} holds no images ({' '.join(sorted(IMAGE_EXTS))})")
        files.append(names)
    if not any(files):
        raise UserError(f"imagefolder: {split_dir} holds no class folders with images")
    return classes, files


def _scan(root: str, split: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names and (file, label) pairs in a stable order."""
    classes, files = scan_classes(root, split)
    items = [
        (os.path.join(root, split, c, f), label) for label, (c, names) in enumerate(zip(classes, files)) for f in names
    ]
    return classes, items


def _cache_paths(root: str, items: list[tuple[str, int]], recipe: Recipe) -> list[Path]:
    """Next to the data when writable, else the user's cache (shared data dirs are often read-only).
    The name changes when any file is added, removed, renamed or rewritten, or the size changes."""
    image_size = recipe.image_size
    how = recipe.eval_resize + (f"-{recipe.eval_crop_ratio}" if recipe.eval_resize == "center-crop" else "")
    lines = [f"v{CACHE_VERSION} size={image_size} {how}\n"]
    for path, label in items:
        st = os.stat(path)
        lines.append(f"{path[len(root) :]}\t{label}\t{st.st_size}\t{st.st_mtime_ns}\n")
    key = hashlib.sha256("".join(lines).encode("utf-8", "surrogateescape")).hexdigest()[:20]
    where = hashlib.sha256(os.path.realpath(root).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    user = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "dist_cnn"
    # One cache per (folder, size): a run at another --image-size must not delete this one.
    return [d / f"imagefolder-{where}-s{image_size}{how}-{key}.pt" for d in (Path(root) / ".dist_cnn_cache", user)]


def _decode_all(items: list[tuple[str, int]], recipe: Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """Each file decoded and prepared by the evaluation transform, as a streamed read prepares it."""
    x = torch.stack([eval_transform(read_file(path, recipe.max_pixels), recipe) for path, _ in items])
    return x, torch.tensor([label for _, label in items], dtype=torch.int64)


def _load_cache(path: Path) -> dict | None:
    try:
        data = torch.load(path, weights_only=True)  # tensors, lists and strings only: nothing to execute
        assert {"classes", "train_x", "train_y", "test_x", "test_y"} <= set(data)
        return data
    except Exception as e:  # truncated or foreign: decode again
        log.info(f"ignoring unreadable cache {path} ({one_line(e)})")


def _save_cache(data: dict, paths: list[Path]) -> None:
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda f: torch.save(data, f))  # other ranks see no file or the whole file
        except (OSError, RuntimeError):  # read-only or full: try the next place
            continue
        for stale in path.parent.glob(path.name.rsplit("-", 1)[0] + "-*.pt"):  # this folder and size, older contents
            if stale != path:
                stale.unlink(missing_ok=True)
        return
    log.info(f"could not write the image cache to {' or '.join(str(p.parent) for p in paths)}; it is decoded each run")


def _load_imagefolder(cfg: DataConfig) -> Dataset:
    root = os.path.normpath(cfg.data_dir)
    if not os.path.isdir(root):
        raise UserError(f"imagefolder: {root} not found; point --data-dir at a folder holding train/ and test/")
    classes, train = _scan(root, "train")
    test_classes, test = _scan(root, "test")
    if test_classes != classes:
        differ = sorted(set(classes) ^ set(test_classes))
        raise UserError(f"imagefolder: train/ and test/ class folders differ ({differ})")
    recipe = recipe_of(cfg)
    paths = _cache_paths(root, train + test, recipe)
    data = next((d for p in paths if p.is_file() and (d := _load_cache(p)) is not None), None)
    if data is None:
        log.info(f"decoding {len(train) + len(test)} images from {root} into a cache (once) ...")
        data = dict(classes=classes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision.io's, once per image
            data["train_x"], data["train_y"] = _decode_all(train, recipe)
            data["test_x"], data["test_y"] = _decode_all(test, recipe)
        _save_cache(data, paths)
    tensors = (data[k] for k in ("train_x", "train_y", "test_x", "test_y"))
    return Dataset(
        cfg.dataset, list(data["classes"]), *tensors, folder_stats=True, test_names=[path for path, _ in test]
    )


# ----------------------------------------------------------------------------- synthetic


def _synthetic_split(templates: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image is its class's template at a random contrast (some nearly invisible) under a random
    colour cast and heavy noise: a small CNN learns it within an epoch, but not perfectly."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randperm(n, generator=g) % len(templates)  # balanced classes in random order
    contrast = 0.05 + 0.95 * torch.rand(n, 1, 1, 1, generator=g)
    cast = 50 * (2 * torch.rand(n, 3, 1, 1, generator=g) - 1)
    x = torch.randn(n, 3, 32, 32, generator=g).mul_(70).add_(80 * contrast * templates[y] + cast + 128)
    return x.round_().clamp_(0, 255).to(torch.uint8), y


def load_synthetic(cfg: DataConfig) -> Dataset:
    """The synthetic set: own generators with constant seeds, so the same data whatever the global RNG
    state or the sizes asked for."""
    g = torch.Generator().manual_seed(1234)
    templates = F.interpolate(2 * torch.rand(10, 3, 4, 4, generator=g) - 1, size=(32, 32), mode="bicubic")
    train = _synthetic_split(templates, cfg.synthetic_train_size, seed=1)
    test = _synthetic_split(templates, cfg.synthetic_test_size, seed=2)
    return Dataset("synthetic", [f"pattern{i}" for i in range(10)], *train, *test)


def load_dataset(cfg: DataConfig) -> Dataset:
    """The dataset cfg names, in memory (the rare one-line note, e.g. before a first-time decode, is logged)."""
    if cfg.dataset in CIFAR:
        data = _load_cifar(cfg)
    elif cfg.dataset == "fashion-mnist":
        data = _load_fashion(cfg)
    elif cfg.dataset == "imagefolder":
        data = _load_imagefolder(cfg)
    elif cfg.dataset == "synthetic":
        data = load_synthetic(cfg)
    else:
        raise UserError(f"--dataset: unknown dataset {cfg.dataset!r}")
    for split, x in (("training", data.train_x), ("test", data.test_x)):
        if len(x) == 0:  # nothing to train on or nothing to measure: say so now, not after training
            raise UserError(f"{cfg.dataset} in {cfg.data_dir}: the {split} set is empty")
    return data
