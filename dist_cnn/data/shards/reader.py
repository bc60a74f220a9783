"""One split of a sharded dataset as a source.SampleReader: len, read(i) -> the image's bytes,
label(i), name(i), classes -- what a folder's file list offers, so the stream pipeline's order,
crops, rank slices, resume and evaluation apply unchanged.

Reads are by offset: a pread in an open local shard (the folder's own, or the cache's copy), else a
range request. Each process keeps the shards it read open (all of them, or the most recently used
within its file limit), so an epoch opens each shard a bounded number of times, not one file per
sample. Every member's CRC-32 is checked on read.
"""

from __future__ import annotations

import os
import resource
import zlib
from collections import OrderedDict

import numpy as np

from dist_cnn.data.shards.cache import ShardCache
from dist_cnn.data.shards.index import SplitIndex
from dist_cnn.data.shards.storage import Storage
from dist_cnn.errors import UserError

MIN_OPEN_SHARDS = 16


def open_shards_budget(num_shards: int) -> int:
    """Shard files a process keeps open: all of them when a quarter of its file limit allows (a
    global permutation then opens each shard once a worker and epoch), else the most recent ones."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(MIN_OPEN_SHARDS, min(num_shards, soft // 4 if soft > 0 else MIN_OPEN_SHARDS))


class ShardError(UserError):
    """The dataset itself is wrong (stale index, truncated shard): stops the run even with
    --skip-bad-images, which is for single unreadable images."""

    fatal = True


class ShardSamples:
    """A source.SampleReader over one split's shards."""

    def __init__(self, storage: Storage, split: SplitIndex, classes: list[str], cache: ShardCache | None):
        self.storage, self.index, self.classes, self.cache = storage, split, classes, cache
        self.open_shards = open_shards_budget(len(split.shards))
        if cache is not None:  # no more open than the cache holds: evicted shards are not kept alive
            self.open_shards = min(self.open_shards, cache.capacity(max(split.shard_bytes)))
        self._files: OrderedDict[int, object] = OrderedDict()
        self._pid = None
        self.opens = 0  # shard files this process opened (the benchmark's count)

    def __getstate__(self):
        return {**self.__dict__, "_files": OrderedDict(), "_pid": None}

    def __len__(self) -> int:
        return len(self.index)

    def label(self, i: int) -> int:
        return int(self.index.label[i])

    def name(self, i: int) -> str:
        s = self.index
        return f"{self.storage.join(s.shards[s.shard[i]])}:{s.key[i].decode('utf-8', 'replace')}"

    @property
    def num_shards(self) -> int:
        return len(self.index.shards)

    def read(self, i: int) -> bytes:
        s = self.index
        shard, offset, size = int(s.shard[i]), int(s.offset[i]), int(s.size[i])
        if self.cache is None and not self.storage.local:
            data = self.storage.read_range(s.shards[shard], offset, size)
            if len(data) == s.shard_bytes[shard] and size != len(data):
                raise ShardError(
                    f"shards: {self.storage.join(s.shards[shard])}: the server ignores range requests; "
                    "pass --shard-cache DIR to fetch whole shards"
                )
        else:
            data = os.pread(self._open(shard), size, offset)
        if len(data) != size:
            raise ShardError(
                f"shards: {self.name(i)}: {len(data)} of {size} bytes (truncated shard or stale index); "
                "rebuild the index or the shards"
            )
        if zlib.crc32(data) != int(s.crc32[i]):
            raise ShardError(
                f"shards: {self.name(i)}: checksum mismatch (the shard changed after indexing: stale index); "
                "remove index.json to rebuild it"
            )
        return data

    def _open(self, shard: int) -> int:
        if self._pid != os.getpid():  # a forked worker: the parent's descriptors (and locks) are not ours
            for fd in self._files.values():
                os.close(fd)
            self._files, self._pid = OrderedDict(), os.getpid()
        fd = self._files.get(shard)
        if fd is not None:
            self._files.move_to_end(shard)
            return fd
        name, nbytes = self.index.shards[shard], self.index.shard_bytes[shard]
        if len(self._files) >= self.open_shards:  # before opening: the cache may need to evict it
            os.close(self._files.popitem(last=False)[1])
        if self.cache is not None:
            fd = self.cache.open(self.storage, name, nbytes)
        else:
            try:
                fd = os.open(self.storage.join(name), os.O_RDONLY)
            except OSError as e:
                raise ShardError(f"shards: cannot read {self.storage.join(name)} ({e.strerror or e})") from None
        self.opens += 1
        self._files[shard] = fd
        return fd

    def index_bytes(self) -> int:
        return self.index.nbytes() + sum(len(n) for n in self.index.shards)

    def shard_of(self) -> np.ndarray:
        return self.index.shard
