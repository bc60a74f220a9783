"""Opening a sharded dataset (--dataset shards --data-dir PATH|URL) for training or evaluation.

Rank 0 reads the index (or builds it once, for shards written by other tools, and keeps it beside
the shards when that folder is writable, else in the cache directory), checks it against the
shards' sizes and the labels against the classes; every rank receives it. Everything is checked
before the first step.
"""

from __future__ import annotations

import logging
import hashlib
import os
from pathlib import Path

from dist_cnn.data.shards import index as ix
from dist_cnn.data.shards.cache import ShardCache, parse_size
from dist_cnn.data.shards.order import parse_shuffle
from dist_cnn.data.shards.reader import ShardSamples
from dist_cnn.data.shards.storage import Storage, storage_options
from dist_cnn.errors import UserError
from dist_cnn.fileio import atomic_write

log = logging.getLogger(__name__)


def index_cache_dir(storage: Storage, shard_cache: str) -> Path:
    """Where the index of a location we cannot write to is kept: one folder per URL."""
    tag = hashlib.sha256(storage.url.encode()).hexdigest()[:16]
    base = Path(shard_cache) if shard_cache else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / ("index" if shard_cache else "dist_cnn/shards") / tag


def _read_local(folder: Path):
    def read(name: str) -> bytes | None:
        try:
            return (folder / name).read_bytes()
        except FileNotFoundError:
            return None

    return read


def _save(files: dict[str, bytes], folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name in sorted(files, key=lambda n: n == ix.INDEX_FILE):  # index.json last: it names the others
            atomic_write(folder / name, lambda f, b=files[name]: f.write(b))
        return True
    except OSError:
        return False


def load_index(storage: Storage, splits: list[str], shard_cache: str = "") -> tuple[ix.Index, str]:
    """The index and where it lives (for messages)."""
    raw = storage.probe(lambda: storage.read_all(ix.INDEX_FILE))  # first contact: bounded by --timeout
    if raw is not None:
        return ix.from_files(lambda n: raw if n == ix.INDEX_FILE else storage.read_all(n), storage.url, splits), storage.url
    cached = index_cache_dir(storage, shard_cache)
    if (cached / ix.INDEX_FILE).is_file():
        return ix.from_files(_read_local(cached), str(cached), splits), str(cached)
    log.info(f"no {ix.INDEX_FILE} in {storage.url}: indexing its shards (once) ...")
    index = ix.build(storage, splits)
    files = ix.to_files(index)
    if storage.local and os.access(storage.url, os.W_OK) and _save(files, Path(storage.url)):
        return index, storage.url
    if _save(files, cached):
        return index, str(cached)
    log.info(f"could not keep the index in {storage.url} or {cached}; it is rebuilt each run")
    return index, storage.url


def open_split_readers(data_cfg, timeout: float):
    """(classes, train samples, test samples) of --data-dir, checked."""
    parse_shuffle(data_cfg.shuffle)
    storage = Storage(data_cfg.data_dir, storage_options(data_cfg.storage_options), timeout)
    if storage.local and not os.path.isdir(storage.url):
        raise UserError(f"shards: {storage.url} not found; point --data-dir at a folder, http(s):// or s3:// prefix")
    splits = ["train", data_cfg.test_split]
    index, where = load_index(storage, splits, data_cfg.shard_cache)
    ix.check_fresh(storage, index, where)
    ix.check_labels(index, where)
    cache = None
    if data_cfg.shard_cache:
        cache = ShardCache(data_cfg.shard_cache, parse_size(data_cfg.shard_cache_size, "--shard-cache-size"))
        cache.check(max(max(s.shard_bytes) for s in index.splits.values()))
    readers = [ShardSamples(storage, index.splits[s], index.classes, cache) for s in splits]
    return index.classes, readers[0], readers[1]
