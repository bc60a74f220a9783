"""The index of a sharded dataset: every sample's shard, byte offset, size, CRC-32 and label.

Files, beside the shards (or in the cache directory when that location is not writable):
- index.json: {"format", "version", "classes", "splits": {SPLIT: {"samples", "arrays", "shards":
  [[name, bytes], ...]}}}; shard names are relative to the dataset's root;
- index-SPLIT.npz (numpy arrays, no pickles): key (bytes), shard (int32), offset (int64, the member's
  data in the tar), size (int64), crc32 (uint32), label (int64).

A split's samples are in key order: a folder written by `dist-cnn shard` keeps the folder's order
(keys are folder positions), so sample i is file i of the folder and the stream loader's draws apply.
Any tar in the webdataset layout is indexed the same way: members KEY.EXT grouped by KEY (the name up
to the first dot of the base name), one image (jpg, png, ...) and one label per sample: KEY.cls (an
integer, as webdataset writes it) or KEY.json with an integer "label" (or "cls").
"""

from __future__ import annotations

import logging
import io
import json
import re
import tarfile
import zlib
from dataclasses import dataclass

import numpy as np

from dist_cnn.data.datasets import IMAGE_EXTS
from dist_cnn.data.shards.storage import Storage
from dist_cnn.errors import UserError, one_line

log = logging.getLogger(__name__)

FORMAT, VERSION = "dist_cnn shards index", 1
INDEX_FILE = "index.json"
CLASSES_FILE = "classes.txt"  # optional class names, one a line, for shards written by other tools
IMAGE_SUFFIXES = {e[1:] for e in IMAGE_EXTS}
LABEL_SUFFIXES = ("cls", "class", "label")
JSON_LABEL_KEYS = ("label", "cls")
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


@dataclass
class SplitIndex:
    shards: list[str]  # names relative to the root
    shard_bytes: list[int]
    key: np.ndarray  # S<n>
    shard: np.ndarray  # int32
    offset: np.ndarray  # int64
    size: np.ndarray  # int64
    crc32: np.ndarray  # uint32
    label: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.key)

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in ("key", "shard", "offset", "size", "crc32", "label")}

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays().values())


@dataclass
class Index:
    classes: list[str]
    splits: dict[str, SplitIndex]


# ----------------------------------------------------------------------------- building


def _label(suffix: str, data: bytes) -> int | None:
    try:
        if suffix == "json":
            meta = json.loads(data)
            value = next((meta[k] for k in JSON_LABEL_KEYS if isinstance(meta, dict) and k in meta), None)
        else:
            value = data.decode().strip()
        if isinstance(value, bool) or value is None:
            return None
        return int(value) if isinstance(value, (int, str)) else None
    except (ValueError, UnicodeDecodeError):
        return None


def index_shard(storage: Storage, name: str, shard_id: int) -> list[tuple]:
    """(key, shard, offset, size, crc32, label) of each sample of one shard, read front to back once."""
    url, samples = storage.join(name), {}
    try:
        with storage.open(name) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for m in tar:
                match = _KEY.match(m.name)
                if not m.isfile() or not match or m.name.rsplit("/", 1)[-1].startswith("__"):
                    continue
                key, suffix = match.group(1), match.group(2).lower()
                s = samples.setdefault(key, {})
                if suffix in IMAGE_SUFFIXES and "image" not in s:
                    data = tar.extractfile(m).read()
                    if len(data) != m.size:
                        raise tarfile.ReadError("unexpected end of data")
                    s["image"] = (m.offset_data, m.size, zlib.crc32(data))
                elif suffix in LABEL_SUFFIXES or suffix == "json":
                    label = _label(suffix, tar.extractfile(m).read())
                    if label is None:
                        raise UserError(f"shards: {url}: {m.name} holds no integer label")
                    s["label"] = label
    except tarfile.TarError as e:
        raise UserError(f"shards: {url} is not a readable tar (truncated or damaged: {one_line(e)})") from None
    out = []
    for key, s in samples.items():
        if "image" not in s:
            continue  # metadata without an image (webdataset allows any extra members)
        if "label" not in s:
            raise UserError(f"shards: {url}: sample {key!r} has no label ({key}.cls, or {key}.json with \"label\")")
        out.append((key, shard_id, *s["image"], s["label"]))
    return out


def build_split(storage: Storage, shards: list[str], sizes: list[int]) -> SplitIndex:
    rows = []
    for i, name in enumerate(shards):
        if i % 100 == 0:
            log.info(f"indexing {storage.join(name)} ({i + 1}/{len(shards)}) ...")
        rows += index_shard(storage, name, i)
    if not rows:
        raise UserError(f"shards: no samples in {storage.join(shards[0]) if shards else storage.url}")
    keys = np.array([r[0].encode("utf-8", "surrogateescape") for r in rows], dtype=np.bytes_)
    order = np.argsort(keys, kind="stable")
    col = lambda j, t: np.array([r[j] for r in rows], dtype=t)[order]  # noqa: E731
    return SplitIndex(
        shards,
        list(sizes),
        keys[order],
        col(1, np.int32),
        col(2, np.int64),
        col(3, np.int64),
        col(4, np.uint32),
        col(5, np.int64),
    )


def find_shards(storage: Storage, split: str) -> tuple[list[str], list[int]]:
    """SPLIT/*.tar, else SPLIT-*.tar / SPLIT_*.tar at the root (webdataset's usual names), sorted."""
    listing = storage.sizes(split)
    if listing is None:
        raise UserError(
            f"shards: {storage.url} cannot be listed and has no {INDEX_FILE}; index the shards where they can "
            "be listed (dist-cnn trains once on a copy) and put index.json and index-*.npz beside them"
        )
    found = {n: s for n, s in listing.items() if n.endswith(".tar")}
    if not found:
        root = storage.sizes("") or {}
        found = {n: s for n, s in root.items() if n.endswith(".tar") and n.startswith((f"{split}-", f"{split}_"))}
    names = sorted(found)
    if not names:
        raise UserError(
            f"shards: no index ({INDEX_FILE}) and no shards for the {split!r} split in {storage.url} "
            f"(looked for {split}/*.tar and {split}-*.tar)"
        )
    return names, [found[n] for n in names]


def check_labels(index: Index, where: str) -> None:
    n = len(index.classes)
    for split, s in index.splits.items():
        bad = np.flatnonzero((s.label < 0) | (s.label >= n))
        if len(bad):
            i = int(bad[0])
            raise UserError(
                f"shards: {where}/{s.shards[s.shard[i]]}: sample {s.key[i].decode(errors='replace')!r} of {split} "
                f"has label {int(s.label[i])}, outside the {n} classes [0, {n})"
            )


def build(storage: Storage, splits: list[str]) -> Index:
    """The index of shards written by any tool in the webdataset layout."""
    built = {split: build_split(storage, *find_shards(storage, split)) for split in splits}
    raw = storage.read_all(CLASSES_FILE)
    if raw is not None:
        classes = [c for c in raw.decode().splitlines() if c.strip()]
    else:  # integer labels only: the classes are 0..max of the training labels
        classes = [str(c) for c in range(int(built[splits[0]].label.max()) + 1)]
    index = Index(classes, built)
    check_labels(index, storage.url)
    return index


# ----------------------------------------------------------------------------- files


def to_files(index: Index) -> dict[str, bytes]:
    """{file name: bytes} of the index's files."""
    files, meta = {}, {"format": FORMAT, "version": VERSION, "classes": index.classes, "splits": {}}
    for split, s in index.splits.items():
        buf = io.BytesIO()
        np.savez(buf, **s.arrays())
        name = f"index-{split}.npz"
        files[name] = buf.getvalue()
        meta["splits"][split] = {
            "samples": len(s),
            "arrays": name,
            "arrays_bytes": len(files[name]),
            "shards": [[n, b] for n, b in zip(s.shards, s.shard_bytes)],
        }
    files[INDEX_FILE] = (json.dumps(meta, indent=1) + "\n").encode()
    return files


def from_files(read, where: str, splits: list[str]) -> Index:
    """The index read through read(name) -> bytes | None; `where` names it in messages."""
    try:
        meta = json.loads(read(INDEX_FILE))
        ok = meta.get("format") == FORMAT and isinstance(meta.get("classes"), list)
    except (ValueError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise UserError(f"shards: {where}/{INDEX_FILE} is not a shards index; remove it to rebuild it")
    if meta.get("version") != VERSION:
        raise UserError(f"shards: {where}/{INDEX_FILE} is version {meta.get('version')}, this reads {VERSION}")
    out = {}
    for split in splits:
        entry = meta["splits"].get(split)
        if entry is None:
            raise UserError(f"shards: {where}/{INDEX_FILE} has no {split!r} split (it has {sorted(meta['splits'])})")
        raw = read(entry["arrays"])
        if raw is None or len(raw) != entry["arrays_bytes"]:
            raise UserError(
                f"shards: {where}/{entry['arrays']} is missing or not the one {INDEX_FILE} describes; "
                f"remove {INDEX_FILE} to rebuild the index"
            )
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        names, sizes = zip(*entry["shards"]) if entry["shards"] else ((), ())
        out[split] = SplitIndex(list(names), list(sizes), **arrays)
    return Index([str(c) for c in meta["classes"]], out)


def check_fresh(storage: Storage, index: Index, where: str) -> None:
    """Every shard the index names still has the size it had when indexed, and no new shard appeared
    beside them: otherwise the index is stale (a sample read by offset would be another's bytes).
    Same-size rewrites are caught by each member's CRC-32 when it is read."""
    fix = f"remove {where}/{INDEX_FILE} (and index-*.npz) to rebuild it"
    for split, s in index.splits.items():
        folders = sorted({n.rsplit("/", 1)[0] if "/" in n else "" for n in s.shards})
        listed = {}
        for folder in folders:
            got = storage.sizes(folder)
            if got is None:  # cannot list: one request per shard
                got = {n: storage.size(n) for n in s.shards if (n.rsplit("/", 1)[0] if "/" in n else "") == folder}
            listed.update(got)
        for name, nbytes in zip(s.shards, s.shard_bytes):
            now = listed.get(name)
            if now is None:
                raise UserError(f"shards: {storage.join(name)} is missing (the index of {split} names it); {fix}")
            if now != nbytes:
                raise UserError(
                    f"shards: {storage.join(name)} is {now} bytes, indexed at {nbytes}: truncated or changed "
                    f"after indexing (stale index); {fix}"
                )
        known = set(s.shards)
        new = sorted(n for n in listed if n.endswith(".tar") and n not in known and _same_split(n, s.shards))
        if new:
            raise UserError(f"shards: {storage.join(new[0])} is not in the index of {split} (stale index); {fix}")


def _same_split(name: str, shards: list[str]) -> bool:
    """Whether a new tar sits with the split's shards (its folder, or its SPLIT- prefix at the root)."""
    folder = name.rsplit("/", 1)[0] if "/" in name else ""
    if folder:
        return any(s.startswith(folder + "/") for s in shards)
    prefix = re.match(r"^[^-_]+[-_]", name)
    return bool(prefix) and any(s.startswith(prefix.group(0)) for s in shards)
