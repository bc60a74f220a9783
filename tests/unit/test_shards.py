"""Sharded datasets in-process: the writer, the index, reads by offset (local, HTTP, S3), the shards:K
order, the bounded cache, and every bad input as one line."""

import io
import json
import os
import pickle
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from dist_cnn.data.folder import scan_folder
from dist_cnn.data.shards import index as ix
from dist_cnn.data.shards.cache import parse_size
from dist_cnn.data.shards.dataset import open_split_readers
from dist_cnn.data.shards.order import parse_shuffle, window_order
from dist_cnn.data.shards.storage import Storage
from dist_cnn.data.shards.writer import write_shards
from dist_cnn.errors import UserError
from tests.support.shard_servers import S3_ENV, http_server, s3_server, upload


def make_folder(root, n_train=30, n_test=7, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            h, w = (int(v) for v in rng.integers(20, 60, 2))
            d = root / split / f"k{i % classes}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i:03d}.jpg", quality=85)
    return root


def cfg(data_dir, **kw):
    base = dict(
        data_dir=str(data_dir),
        test_split="test",
        shuffle="global",
        storage_options="",
        shard_cache="",
        shard_cache_size="1GB",
    )
    return SimpleNamespace(**{**base, **kw})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("folder") / "imgs")


@pytest.fixture(scope="module")
def shards(tmp_path_factory, folder):
    out = tmp_path_factory.mktemp("shards") / "ds"
    write_shards(str(folder), str(out), shard_size=parse_size("8KB", "x"))
    return out


def fresh_copy(shards, tmp_path):
    import shutil

    return shutil.copytree(shards, tmp_path / "copy")


def test_writer_keeps_the_folders_order_bytes_and_labels(folder, shards):
    classes, train, test = open_split_readers(cfg(shards), timeout=5)
    files = scan_folder(str(folder))
    assert classes == ["k0", "k1", "k2"] and len(train) == 30 and len(test) == 7
    assert train.num_shards > 3  # small shards: several of them
    for samples, listed in ((train, files.train), (test, files.test)):
        for i in range(len(listed)):
            assert samples.read(i) == listed.read(i) and samples.label(i) == listed.label(i)
    # training samples are spread over the shards in a seeded random order, not class by class
    first = [int(train.index.label[i]) for i in np.flatnonzero(train.index.shard == 0)]
    assert len(set(first)) > 1


def test_our_shards_read_by_webdataset_itself(shards):
    urls = sorted(str(p) for p in (shards / "train").glob("*.tar"))
    seen = {s["__key__"]: (s["cls"], s["jpg"]) for s in wds.WebDataset(urls, shardshuffle=False)}
    assert len(seen) == 30
    _, train, _ = open_split_readers(cfg(shards), timeout=5)
    for i in range(len(train)):
        label, data = seen[train.index.key[i].decode()]
        assert int(label) == train.label(i) and data == train.read(i)


def foreign_shards(root, label_as="cls", n=12, classes=2, **writer_kw):
    """Shards written by webdataset's ShardWriter, the way its users write them."""
    rng = np.random.default_rng(1)
    images = {}
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        with wds.ShardWriter(str(root / split / "part-%03d.tar"), maxcount=5, verbose=0, **writer_kw) as sink:
            for i in range(n):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(buf, format="PNG")
                label = {"cls": i % classes} if label_as == "cls" else {"json": {"label": i % classes, "src": "x"}}
                sink.write({"__key__": f"{split}/img{i:04d}", "png": buf.getvalue(), **label})
                images[(split, f"{split}/img{i:04d}")] = buf.getvalue()
    return images


@pytest.mark.parametrize("label_as", ["cls", "json"])
def test_shards_from_webdataset_shardwriter_read_unchanged(tmp_path, label_as):
    images = foreign_shards(tmp_path / "ds", label_as)
    classes, train, test = open_split_readers(cfg(tmp_path / "ds"), timeout=5)
    assert classes == ["0", "1"] and len(train) == 12 and train.num_shards == 3
    for split, samples in (("train", train), ("test", test)):
        for i in range(len(samples)):
            key = samples.index.key[i].decode()
            assert samples.read(i) == images[(split, key)] and samples.label(i) == int(key[-4:]) % 2
    assert (tmp_path / "ds" / "index.json").is_file()  # built once, kept beside the shards
    again = open_split_readers(cfg(tmp_path / "ds"), timeout=5)[1]
    assert np.array_equal(again.index.offset, train.index.offset)


def test_read_only_location_keeps_the_index_in_the_cache(tmp_path, monkeypatch):
    foreign_shards(tmp_path / "ds")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    os.chmod(tmp_path / "ds", 0o555)
    try:
        if os.access(tmp_path / "ds", os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        open_split_readers(cfg(tmp_path / "ds"), timeout=5)
    finally:
        os.chmod(tmp_path / "ds", 0o755)
    assert list((tmp_path / "xdg" / "dist_cnn" / "shards").glob("*/index.json"))


def test_window_order_is_a_pure_function_and_reads_k_shards_at_a_time():
    shard_of = np.repeat(np.arange(10, dtype=np.int32), 7)  # 10 shards of 7 samples
    a = window_order(shard_of, 10, 3, seed=5, epoch=2)
    assert torch.equal(a, window_order(shard_of, 10, 3, seed=5, epoch=2))
    assert not torch.equal(a, window_order(shard_of, 10, 3, seed=5, epoch=3))
    assert sorted(a.tolist()) == list(range(70))
    windows = [set(shard_of[a[i : i + 21].numpy()].tolist()) for i in range(0, 70, 21)]
    assert all(len(w) <= 3 for w in windows) and set().union(*windows) == set(range(10))
    assert parse_shuffle("global") is None and parse_shuffle("shards:4") == 4
    for bad in ("shards:0", "shards", "local", "shards:x"):
        with pytest.raises(UserError, match="--shuffle"):
            parse_shuffle(bad)


@pytest.mark.parametrize("text,value", [("512MB", 512_000_000), ("1GiB", 2**30), ("100", 100), ("1.5kb", 1500)])
def test_parse_size(text, value):
    assert parse_size(text, "--shard-size") == value


def test_cache_fetches_each_shard_once_and_stays_under_its_limit(tmp_path, shards):
    biggest = max(p.stat().st_size for p in (shards / "train").glob("*.tar"))
    c = cfg(shards, shard_cache=str(tmp_path / "cache"), shard_cache_size=str(2 * biggest))
    _, train, _ = open_split_readers(c, timeout=5)
    for i in range(len(train)):
        train.read(i)
    cached = list((tmp_path / "cache").glob("*.tar"))
    assert train.cache.fetched >= train.num_shards and 1 <= len(cached) <= 2
    assert sum(p.stat().st_size for p in cached) <= 2 * biggest


# ----------------------------------------------------------------------------- remote storage


def test_http_range_reads_and_whole_shard_cache(tmp_path, shards):
    _, local, _ = open_split_readers(cfg(shards), timeout=5)
    with http_server(shards.parent) as base:
        _, remote, test = open_split_readers(cfg(f"{base}/{shards.name}"), timeout=5)
        assert [remote.read(i) for i in range(len(remote))] == [local.read(i) for i in range(len(local))]
        c = cfg(f"{base}/{shards.name}", shard_cache=str(tmp_path / "cache"))
        _, cached, _ = open_split_readers(c, timeout=5)
        assert cached.read(3) == local.read(3) and cached.cache.fetched == 1
        assert remote.name(0).startswith(base)


def test_http_server_without_ranges_is_one_line(shards):
    with http_server(shards.parent, ranges=False) as base:
        _, remote, _ = open_split_readers(cfg(f"{base}/{shards.name}"), timeout=5)
        with pytest.raises(UserError, match="ignores range requests.*--shard-cache"):
            remote.read(0)


def test_foreign_shards_over_http_are_indexed_into_the_cache(tmp_path, monkeypatch):
    foreign_shards(tmp_path / "www" / "ds")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with http_server(tmp_path / "www") as base:
        classes, train, _ = open_split_readers(cfg(f"{base}/ds"), timeout=5)
        assert len(train) == 12 and train.read(0)[:4] == b"\x89PNG"
    assert not (tmp_path / "www" / "ds" / "index.json").exists()
    assert list((tmp_path / "xdg").rglob("index.json"))


@pytest.mark.slow
def test_s3_reads_through_moto(monkeypatch, shards):
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    _, local, _ = open_split_readers(cfg(shards), timeout=5)
    with s3_server() as endpoint:
        upload(endpoint, "data", shards, "sets/ds")
        c = cfg("s3://data/sets/ds", storage_options=json.dumps({"endpoint_url": endpoint}))
        _, remote, _ = open_split_readers(c, timeout=10)
        assert [remote.read(i) for i in range(0, 30, 7)] == [local.read(i) for i in range(0, 30, 7)]
        with pytest.raises(UserError, match="s3://nobucket"):
            open_split_readers(cfg("s3://nobucket/x", storage_options=c.storage_options), timeout=5)


def test_unreachable_url_is_one_line_naming_it_within_the_timeout():
    import socket
    import time

    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/ds"
        start = time.monotonic()
        with pytest.raises(UserError, match=url):
            open_split_readers(cfg(url), timeout=1)
        assert time.monotonic() - start < 30  # bounded, not hung
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/ds"
    with pytest.raises(UserError, match=url):
        open_split_readers(cfg(url), timeout=2)


# ----------------------------------------------------------------------------- bad input


def test_truncated_shard_without_index(tmp_path):
    foreign_shards(tmp_path / "ds")
    shard = tmp_path / "ds" / "train" / "part-001.tar"
    shard.write_bytes(shard.read_bytes()[:1500])
    with pytest.raises(UserError, match=r"part-001.tar is not a readable tar \(truncated"):
        open_split_readers(cfg(tmp_path / "ds"), timeout=5)


def test_truncated_or_changed_shard_with_index_is_stale(tmp_path, shards):
    ds = fresh_copy(shards, tmp_path)
    shard = ds / "train" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-1024])
    with pytest.raises(UserError, match=r"shard-000001.tar is \d+ bytes, indexed at \d+.*stale index"):
        open_split_readers(cfg(ds), timeout=5)


def test_same_size_rewrite_is_caught_by_the_checksum(tmp_path, shards):
    ds = fresh_copy(shards, tmp_path)
    _, train, _ = open_split_readers(cfg(ds), timeout=5)
    shard = ds / train.index.shards[train.index.shard[4]]
    data = bytearray(shard.read_bytes())
    data[int(train.index.offset[4]) + 30] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum mismatch.*stale index") as e:
        train.read(4)
    assert getattr(e.value, "fatal", False)  # not an image --skip-bad-images may skip


def test_new_shard_missing_shard_and_missing_arrays_are_stale(tmp_path, shards):
    ds = fresh_copy(shards, tmp_path)
    (ds / "train" / "shard-000099.tar").write_bytes((ds / "train" / "shard-000000.tar").read_bytes())
    with pytest.raises(UserError, match="shard-000099.tar is not in the index"):
        open_split_readers(cfg(ds), timeout=5)
    (ds / "train" / "shard-000099.tar").unlink()
    (ds / "train" / "shard-000000.tar").unlink()
    with pytest.raises(UserError, match="shard-000000.tar is missing"):
        open_split_readers(cfg(ds), timeout=5)
    (ds / "index-test.npz").unlink()
    with pytest.raises(UserError, match="index-test.npz is missing"):
        open_split_readers(cfg(ds), timeout=5)


def _tar(path, members):
    with tarfile.open(path, "w") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def _png():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "members,classes,message",
    [
        ([("a.png", None)], None, r"sample 'a' has no label"),
        ([("a.png", None), ("a.cls", b"cat")], None, r"a.cls holds no integer label"),
        ([("a.png", None), ("a.json", b'{"text": "x"}')], None, r"a.json holds no integer label"),
        ([("a.png", None), ("a.cls", b"5")], "x\ny\n", r"label 5, outside the 2 classes"),
        ([("a.png", None), ("a.cls", b"-1")], None, r"label -1, outside"),
    ],
)
def test_bad_labels_are_one_line(tmp_path, members, classes, message):
    ds = tmp_path / "ds"
    for split in ("train", "test"):
        (ds / split).mkdir(parents=True)
        good = [("b.png", _png()), ("b.cls", b"0")]
        _tar(ds / split / "s-0.tar", good + [(n, _png() if d is None else d) for n, d in members])
    if classes:
        (ds / "classes.txt").write_text(classes)
    with pytest.raises(UserError, match=message) as e:
        open_split_readers(cfg(ds), timeout=5)
    assert "\n" not in str(e.value)


def test_no_shards_and_no_index(tmp_path):
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(UserError, match="no index .* and no shards"):
        open_split_readers(cfg(tmp_path / "empty"), timeout=5)
    with pytest.raises(UserError, match="not found"):
        open_split_readers(cfg(tmp_path / "nowhere"), timeout=5)


def test_writer_refuses_a_non_empty_out_and_bad_images(tmp_path, folder):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        write_shards(str(folder), str(tmp_path / "out"), shard_size=10**6)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    bad = make_folder(tmp_path / "bad", n_train=6, n_test=3)
    (bad / "train" / "k0" / "000.jpg").write_bytes(b"not an image")
    with pytest.raises(UserError, match="000.jpg.*--skip-bad-images"):
        write_shards(str(bad), str(tmp_path / "o1"), shard_size=10**6)
    assert not (tmp_path / "o1").exists() and not list(tmp_path.glob(".o1.*"))
    reports = write_shards(str(bad), str(tmp_path / "o2"), shard_size=10**6, skip_bad=True)
    assert reports["train"].samples == 5 and len(reports["train"].skipped) == 1


def test_max_side_reencodes_only_larger_images(tmp_path, folder):
    reports = write_shards(str(folder), str(tmp_path / "small"), shard_size=10**6, max_side=40)
    _, train, _ = open_split_readers(cfg(tmp_path / "small"), timeout=5)
    files = scan_folder(str(folder)).train
    for i in range(len(train)):
        with Image.open(files.path(i)) as im:
            big = max(im.size) > 40
        with Image.open(io.BytesIO(train.read(i))) as im:
            assert max(im.size) == 40 if big else train.read(i) == files.read(i)
    assert reports["train"].reencoded == sum(max(Image.open(files.path(i)).size) > 40 for i in range(len(files))) > 0


def test_index_files_hold_no_pickles(shards):
    meta = json.loads((shards / "index.json").read_text())
    assert meta["format"] == ix.FORMAT and meta["splits"]["train"]["samples"] == 30
    with np.load(shards / "index-train.npz", allow_pickle=False) as z:
        assert set(z.files) == {"key", "shard", "offset", "size", "crc32", "label"}
    storage = Storage(str(shards))
    assert storage.sizes("train") and storage.size("nothing.tar") is None


def test_an_epoch_in_any_order_opens_each_shard_once(shards):
    _, train, _ = open_split_readers(cfg(shards), timeout=5)
    for order in (torch.randperm(len(train), generator=torch.Generator().manual_seed(0)), torch.arange(len(train))):
        reader = pickle.loads(pickle.dumps(train))  # as a DataLoader worker gets it: no open files
        for i in order.tolist():
            reader.read(i)
        assert reader.opens == train.num_shards


def test_cache_never_evicts_a_shard_a_reader_holds_open(tmp_path, shards):
    biggest = max(p.stat().st_size for p in (shards / "train").glob("*.tar"))
    c = cfg(shards, shard_cache=str(tmp_path / "cache"), shard_cache_size=str(2 * biggest))
    _, train, _ = open_split_readers(c, timeout=5)
    a, b = pickle.loads(pickle.dumps(train)), pickle.loads(pickle.dumps(train))  # two workers
    first = int(train.index.shard[0])
    a.read(0)  # a holds shard `first` open
    for i in np.flatnonzero(train.index.shard != first)[:20].tolist():
        b.read(i)  # b cycles through other shards, evicting what it can
    assert a.read(0) == train.read(0) and a.opens == 1
    held = a.cache.path(a.storage, train.index.shards[first], train.index.shard_bytes[first])
    assert os.path.exists(held)
