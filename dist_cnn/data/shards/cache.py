"""A bounded local cache of whole shards (--shard-cache DIR, --shard-cache-size).

A shard is fetched once into DIR and then read by offset there. Every process of a node shares the
folder: a per-shard lock makes one process fetch while the others wait for it, and the least recently
used shards are deleted to stay under the size limit. A reader holds a shared lock on each cached
shard it keeps open (at most as many as the cache holds), and eviction passes over those, so the
files on disk stay within the limit unless the processes together hold more shards open than it
holds. A cached file's name carries the shard's URL and size, so a changed shard is
fetched again, never read stale.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import tempfile

from dist_cnn.data.shards.storage import Storage
from dist_cnn.errors import UserError

UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12}
UNITS |= {"tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str, flag: str) -> int:
    """'512MB' -> 512_000_000; '1GiB' -> 2**30; a plain number is bytes."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in UNITS or float(m.group(1)) <= 0:
        raise UserError(f"{flag}: expected a size such as 512MB, 20GB or 1GiB, got {text!r}")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


class ShardCache:
    def __init__(self, directory: str, max_bytes: int):
        self.dir, self.max_bytes = os.path.abspath(directory), max_bytes
        self.fetched = 0  # shards this process downloaded

    def check(self, largest_shard: int) -> None:
        try:
            os.makedirs(self.dir, exist_ok=True)
        except OSError as e:
            raise UserError(f"--shard-cache {self.dir}: cannot create it ({e.strerror or e})") from None
        if not os.access(self.dir, os.W_OK):
            raise UserError(f"--shard-cache {self.dir} is not writable")
        if largest_shard > self.max_bytes:
            raise UserError(
                f"--shard-cache-size {self.max_bytes} bytes cannot hold the largest shard ({largest_shard} bytes)"
            )

    def path(self, storage: Storage, name: str, nbytes: int) -> str:
        tag = hashlib.sha256(storage.join(name).encode()).hexdigest()[:20]
        return os.path.join(self.dir, f"{tag}-{nbytes}.tar")

    def local(self, storage: Storage, name: str, nbytes: int) -> str:
        """The cached copy of shard `name`, fetched first when absent."""
        path = self.path(storage, name, nbytes)
        if _has(path, nbytes):
            return path
        os.makedirs(self.dir, exist_ok=True)  # another node's rank 0 created its own
        with open(path + ".lock", "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # others on this node wait, then find it fetched
            if not _has(path, nbytes):
                self._make_room(nbytes)
                fd, tmp = tempfile.mkstemp(prefix=".fetch-", suffix=".tmp", dir=self.dir)
                os.close(fd)
                try:
                    storage.get(name, tmp)
                    got = os.path.getsize(tmp)
                    if got != nbytes:
                        raise UserError(
                            f"shards: {storage.join(name)} is {got} bytes, indexed at {nbytes}: truncated or changed "
                            "after indexing (stale index)"
                        )
                    os.replace(tmp, path)
                    self.fetched += 1
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
        return path

    def capacity(self, largest_shard: int) -> int:
        """Shards the cache holds: how many a reader may keep open."""
        return max(1, self.max_bytes // max(1, largest_shard))

    def open(self, storage: Storage, name: str, nbytes: int) -> int:
        """A descriptor of the cached copy, shared-locked (eviction passes over it until closed)."""
        for _ in range(3):  # evicted by another process between fetching and opening: fetch again
            path = self.local(storage, name, nbytes)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            fcntl.flock(fd, fcntl.LOCK_SH)
            if os.path.exists(path):
                os.utime(path)  # the eviction order: once per opening, not per sample
                return fd
            os.close(fd)
        raise UserError(f"--shard-cache {self.dir}: {name} is evicted as soon as fetched; raise --shard-cache-size")

    def _make_room(self, need: int) -> None:
        entries = []
        for e in os.scandir(self.dir):
            if e.name.endswith(".tar"):
                try:
                    st = e.stat()
                except FileNotFoundError:
                    continue
                entries.append((st.st_atime_ns, st.st_size, e.path))
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):  # least recently used first
            if total + need <= self.max_bytes:
                break
            if _evict(path):
                total -= size


def _evict(path: str) -> bool:
    """Deletes a cached shard unless a reader holds it open."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        os.unlink(path)
        return True
    finally:
        os.close(fd)


def _has(path: str, nbytes: int) -> bool:
    try:
        return os.path.getsize(path) == nbytes
    except OSError:
        return False
