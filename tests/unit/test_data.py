"""Datasets: every format written for real (small) in tmp_path, then read through load_dataset."""

import gzip
import os
import pickle
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image

from dist_cnn.config import DataConfig
from dist_cnn.data import datasets as data
from dist_cnn.data.datasets import Dataset, load_dataset
from dist_cnn.errors import UserError

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def user_error(cfg, match) -> str:
    with pytest.raises(UserError, match=match) as e:
        load_dataset(cfg)
    assert "\n" not in str(e.value), "the CLI prints one line"
    return str(e.value)


# ----------------------------------------------------------------------------- CIFAR


def write_pickle(path, obj, protocol):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def cifar_images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 3072), dtype=np.uint8)


def write_cifar10(root, keys=bytes, protocol=2):
    """batches.meta + 5 train batches + test_batch, as the official cifar-10-python.tar.gz holds them.
    Keys: bytes as `pickle.load(f, encoding='bytes')` shows them, or str as torchvision's latin1 load does."""
    k = (lambda s: s.encode()) if keys is bytes else str
    folder = root / "cifar-10-batches-py"
    batches = {}
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        x, y = cifar_images(4, i), [(i + j) % 10 for j in range(4)]
        write_pickle(
            folder / name,
            {
                k("batch_label"): k(name),
                k("data"): x,
                k("labels"): y,
                k("filenames"): [k(f"{j}.png") for j in range(4)],
            },
            protocol,
        )
        batches[name] = (x, y)
    write_pickle(
        folder / "batches.meta",
        {k("label_names"): [k(n) for n in CIFAR10_NAMES], k("num_vis"): 3072, k("num_cases_per_batch"): 4},
        protocol,
    )
    return batches


@pytest.mark.parametrize("keys,protocol", [(bytes, 2), (str, 2), (bytes, pickle.HIGHEST_PROTOCOL)])
def test_cifar10_batches(tmp_path, keys, protocol):
    batches = write_cifar10(tmp_path, keys, protocol)
    ds = load_dataset(DataConfig(dataset="cifar10", data_dir=str(tmp_path), download=False))
    assert ds.classes == CIFAR10_NAMES and (ds.num_classes, ds.in_channels, ds.image_size) == (10, 3, 32)
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (4, 3, 32, 32)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64 and ds.train_x.is_contiguous()
    # CIFAR rows are channel planes: 1024 red, then green, then blue, each row-major
    x, y = batches["data_batch_2"]
    assert torch.equal(ds.train_x[4:8], torch.from_numpy(x).view(4, 3, 32, 32))
    assert ds.train_x[4, 1, 0, 5].item() == x[0, 1024 + 5]
    assert ds.train_y[4:8].tolist() == y and ds.test_y.tolist() == batches["test_batch"][1]


def test_cifar10_matches_torchvision_reader(tmp_path, monkeypatch):
    """The str-key form is exactly what torchvision's CIFAR10 reads; only its md5 check is skipped."""
    import torchvision.datasets.cifar as tv_cifar

    write_cifar10(tmp_path, keys=str)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    tv = tv_cifar.CIFAR10(str(tmp_path), train=True, download=False)
    ds = load_dataset(DataConfig(dataset="cifar10", data_dir=str(tmp_path), download=False))
    assert torch.equal(ds.train_x.permute(0, 2, 3, 1), torch.from_numpy(tv.data))
    assert ds.train_y.tolist() == tv.targets and ds.classes == tv.classes


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    fine = [f"fine{i:02d}" for i in range(100)]
    write_pickle(
        folder / "meta",
        {b"fine_label_names": [n.encode() for n in fine], b"coarse_label_names": [b"c%d" % i for i in range(20)]},
        4,
    )
    for name, n in (("train", 6), ("test", 3)):
        write_pickle(
            folder / name,
            {b"data": cifar_images(n, n), b"fine_labels": [99 - i for i in range(n)], b"coarse_labels": [0] * n},
            4,
        )
    ds = load_dataset(DataConfig(dataset="cifar100", data_dir=str(tmp_path), download=False))
    assert ds.classes == fine and ds.num_classes == 100
    assert ds.train_x.shape == (6, 3, 32, 32) and ds.test_x.shape == (3, 3, 32, 32)
    assert ds.train_y.tolist() == [99, 98, 97, 96, 95, 94] and ds.test_y.tolist() == [99, 98, 97]


def test_cifar10_missing_without_download(tmp_path):
    msg = user_error(DataConfig(dataset="cifar10", data_dir=str(tmp_path / "nowhere"), download=False), "CIFAR-10")
    assert "--data-dir" in msg and "--dataset synthetic" in msg and "nowhere" in msg


def test_cifar10_download_failure_is_one_clean_line(tmp_path, monkeypatch, capsys):
    import torchvision.datasets.cifar as tv_cifar

    def offline(*args, **kwargs):
        print("Downloading https://... (chatter that must not reach the terminal)")
        raise urllib.error.URLError("Name or service not known\nsecond line")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    cfg = DataConfig(dataset="cifar10", data_dir=str(tmp_path), download=True)
    msg = user_error(cfg, "could not be downloaded")
    assert "Name or service not known" in msg and "--data-dir" in msg and "--dataset synthetic" in msg
    assert capsys.readouterr().out == ""


def test_cifar_refuses_code_in_pickles(tmp_path):
    batches = write_cifar10(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    write_pickle(tmp_path / "cifar-10-batches-py" / "data_batch_3", {b"data": Evil(), b"labels": []}, 4)
    cfg = DataConfig(dataset="cifar10", data_dir=str(tmp_path), download=False)
    user_error(cfg, "data_batch_3.*refusing")
    assert not marker.exists()
    # the refusal was about that file's content: with the genuine batch back, the same folder loads
    x, y = batches["data_batch_3"]
    write_pickle(tmp_path / "cifar-10-batches-py" / "data_batch_3", {b"data": x, b"labels": y}, 2)
    ds = load_dataset(cfg)
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.train_y[8:12].tolist() == y


def test_cifar_labels_out_of_range(tmp_path):
    write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"
    write_pickle(folder / "test_batch", {b"data": cifar_images(2, 0), b"labels": [3, 10]}, 4)
    cfg = DataConfig(dataset="cifar10", data_dir=str(tmp_path), download=False)
    user_error(cfg, r"labels must be in \[0, 10\)")


# ----------------------------------------------------------------------------- Fashion-MNIST


def idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def write_fashion(folder, n_train=5, n_test=3, gz=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) * 3) % 10,
    }
    for name, arr in arrays.items():
        raw = idx_bytes(arr)
        (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(raw) if gz else raw)
    return arrays


@pytest.fixture
def no_system_fashion(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "FASHION_SYSTEM_DIR", str(tmp_path / "no-system-copy"))


@pytest.mark.parametrize("gz,sub", [(True, ""), (False, ""), (False, "FashionMNIST/raw")])
def test_fashion_mnist_idx(tmp_path, no_system_fashion, gz, sub):
    arrays = write_fashion(tmp_path / "d" / sub, gz=gz)
    ds = load_dataset(DataConfig(dataset="fashion-mnist", data_dir=str(tmp_path / "d")))
    assert ds.train_x.shape == (5, 1, 28, 28) and ds.test_x.shape == (3, 1, 28, 28)
    assert ds.train_x.dtype == torch.uint8 and ds.test_y.dtype == torch.int64 and ds.in_channels == 1
    assert np.array_equal(ds.train_x[:, 0].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(ds.test_x[:, 0].numpy(), arrays["t10k-images-idx3-ubyte"])
    assert ds.test_y.tolist() == [0, 3, 6] and ds.train_y.tolist() == [0, 1, 2, 3, 4]
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot" and len(ds.classes) == 10


def test_fashion_mnist_system_copy(tmp_path, monkeypatch):
    write_fashion(tmp_path / "system")
    monkeypatch.setattr(data, "FASHION_SYSTEM_DIR", str(tmp_path / "system"))
    ds = load_dataset(DataConfig(dataset="fashion-mnist", data_dir=str(tmp_path / "empty")))
    assert len(ds.train_x) == 5


def test_fashion_mnist_bad_files(tmp_path, no_system_fashion):
    cfg = DataConfig(dataset="fashion-mnist", data_dir=str(tmp_path))
    msg = user_error(cfg, "Fashion-MNIST not found")
    assert "--data-dir" in msg and str(tmp_path) in msg
    write_fashion(tmp_path, gz=False)
    labels = tmp_path / "train-labels-idx1-ubyte"
    good = labels.read_bytes()
    labels.write_bytes(b"\x00\x00\x08\x03" + good[4:])  # an image file's magic number
    user_error(cfg, "train-labels-idx1-ubyte.*magic number 0x00000803, expected 0x00000801")
    labels.write_bytes(good[:-1])
    user_error(cfg, "train-labels-idx1-ubyte: 12 bytes do not match")
    labels.write_bytes(idx_bytes(np.arange(4)))
    user_error(cfg, "5 images but 4 labels")
    labels.unlink()
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    user_error(cfg, "train-labels-idx1-ubyte.gz: cannot read")


# ----------------------------------------------------------------------------- image folders


def save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path, quality=95)  # quality: JPEG only


@pytest.fixture
def folder(tmp_path):
    """Two classes; PNG and JPEG, RGB, grayscale and RGBA, of mixed sizes."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    pix = {
        "train/cat/a.png": rng.integers(0, 256, (8, 8, 3)),  # exact size: exact pixels
        "train/cat/b.png": rng.integers(0, 256, (8, 8)),  # grayscale -> 3 equal channels
        "train/dog/c.jpg": np.full((30, 20, 3), (200, 40, 90)),  # resized, lossy
        "train/dog/d.png": np.full((17, 5, 4), (10, 250, 30, 128)),  # RGBA: alpha dropped
        "test/cat/e.png": rng.integers(0, 256, (8, 8, 3)),
        "test/dog/f.PNG": np.full((64, 64, 3), 77),
    }
    for name, arr in pix.items():
        save(root / name, arr)
    (root / "train" / "dog" / "notes.txt").write_text("not an image: ignored")
    return root, pix


def img_cfg(root, size=8):
    return DataConfig(dataset="imagefolder", data_dir=str(root), image_size=size)


def test_imagefolder_decodes(folder, logged):
    root, pix = folder
    ds = load_dataset(img_cfg(root))
    assert ds.classes == ["cat", "dog"] and len(logged) == 1 and "decoding 6 images" in logged[0]
    assert ds.train_x.shape == (4, 3, 8, 8) and ds.test_x.shape == (2, 3, 8, 8) and ds.train_x.dtype == torch.uint8
    assert ds.train_y.tolist() == [0, 0, 1, 1] and ds.test_y.tolist() == [0, 1]
    assert np.array_equal(ds.train_x[0].permute(1, 2, 0).numpy(), pix["train/cat/a.png"])
    assert np.array_equal(ds.train_x[1].numpy(), np.stack([pix["train/cat/b.png"]] * 3))
    assert (ds.train_x[2].int() - torch.tensor([200, 40, 90]).view(3, 1, 1)).abs().max() <= 3
    assert (ds.train_x[3] == torch.tensor([10, 250, 30], dtype=torch.uint8).view(3, 1, 1)).all()
    assert (ds.test_x[1] == 77).all()


def test_imagefolder_cache_hit_and_invalidation(folder, monkeypatch):
    root, _ = folder
    first = load_dataset(img_cfg(root))
    cached = list((root / ".dist_cnn_cache").glob("*.pt"))
    assert len(cached) == 1

    def no_decoding(*a):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(data, "read_file", no_decoding)
    second = load_dataset(img_cfg(root))
    assert torch.equal(first.train_x, second.train_x) and torch.equal(first.test_y, second.test_y)
    assert second.classes == first.classes
    monkeypatch.undo()

    # Rewrite one file: the next load decodes again and replaces the stale cache.
    save(root / "test/dog/f.PNG", np.full((64, 64, 3), 99))
    os.utime(root / "test/dog/f.PNG", ns=(1, 1))
    third = load_dataset(img_cfg(root))
    assert (third.test_x[1] == 99).all()
    assert [p.name for p in (root / ".dist_cnn_cache").glob("*.pt")] != [cached[0].name]
    assert len(list((root / ".dist_cnn_cache").glob("*.pt"))) == 1
    assert load_dataset(img_cfg(root, size=4)).train_x.shape == (4, 3, 4, 4)  # another size, another entry


def test_imagefolder_cache_falls_back_to_user_cache(folder, tmp_path, monkeypatch):
    root, _ = folder
    (root / ".dist_cnn_cache").write_text("a file where the cache folder would go: unwritable")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    first = load_dataset(img_cfg(root))
    assert len(list((tmp_path / "xdg" / "dist_cnn").glob("imagefolder-*.pt"))) == 1
    monkeypatch.setattr(data, "read_file", lambda *a: pytest.fail("decoded although the user cache is valid"))
    assert torch.equal(load_dataset(img_cfg(root)).train_x, first.train_x)


def test_imagefolder_corrupt_cache_is_rebuilt(folder, logged):
    root, _ = folder
    first = load_dataset(img_cfg(root))
    (cache,) = (root / ".dist_cnn_cache").glob("*.pt")
    cache.write_bytes(b"truncated")
    logged.clear()
    assert torch.equal(load_dataset(img_cfg(root)).train_x, first.train_x)
    assert "ignoring unreadable cache" in logged[0]
    assert torch.load(cache, weights_only=True)["classes"] == ["cat", "dog"]  # rewritten whole


def test_imagefolder_corrupt_image_names_file(folder):
    root, _ = folder
    (root / "train/dog/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    user_error(img_cfg(root), "cannot decode image .*train/dog/broken.jpg")


def test_imagefolder_layout_errors(folder, tmp_path):
    root, _ = folder
    msg = user_error(img_cfg(tmp_path / "missing"), "not found")
    assert "--data-dir" in msg and "missing" in msg
    (root / "test/bird").mkdir()
    user_error(img_cfg(root), r"class folders differ \(\['bird'\]\)")
    (root / "train/bird").mkdir()
    user_error(img_cfg(root), "train/bird holds no images")
    user_error(img_cfg(root / "train"), "train/train not found")


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_deterministic_balanced_learnable():
    cfg = DataConfig(dataset="synthetic", synthetic_train_size=2000, synthetic_test_size=500)
    torch.manual_seed(1)
    a = load_dataset(cfg)
    torch.manual_seed(2)
    b = load_dataset(cfg)
    assert isinstance(a, Dataset) and a.num_classes == 10 and a.image_size == 32 and a.in_channels == 3
    assert a.train_x.shape == (2000, 3, 32, 32) and a.test_x.shape == (500, 3, 32, 32)
    assert a.train_x.dtype == torch.uint8 and a.train_y.dtype == torch.int64
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert a.train_y.bincount().tolist() == [200] * 10 and not torch.equal(a.train_x[:500], a.test_x)

    # Learnable but not perfectly separable: matching per-image-normalized class means (fitted on train)
    # is far above chance, short of perfect. (A small CNN reaches ~94% after one epoch of 10k.)
    def feats(x):
        x = x.float() - x.float().mean((2, 3), keepdim=True)  # drops the colour cast; normalize drops contrast
        return torch.nn.functional.normalize(x.flatten(1), dim=1)

    means = torch.stack([feats(a.train_x[a.train_y == c]).mean(0) for c in range(10)])
    acc = ((feats(a.test_x) @ means.T).argmax(1) == a.test_y).float().mean().item()
    assert 0.85 < acc < 0.995, acc
