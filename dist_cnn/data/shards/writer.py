"""An image folder (train/<class>/*, <test split>/<class>/*) -> tar shards in the webdataset layout,
written by webdataset's own ShardWriter, plus their index.

Each split goes to SPLIT/shard-NNNNNN.tar; a sample is KEY.<original extension> (the file's bytes,
unchanged) and KEY.cls (the class index), KEY being the file's position in the folder's sorted
order. Training samples are written in a seeded random order, so a window of a few shards
(--shuffle shards:K) holds every class; the index lists them in key order, which is the folder's.
--max-side N re-encodes (JPEG) only the images whose longer side exceeds N pixels.
"""

from __future__ import annotations

import logging
import io
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from dist_cnn.data.datasets import scan_classes
from dist_cnn.data.shards import index as ix
from dist_cnn.data.shards.storage import Storage
from dist_cnn.errors import UserError, one_line

log = logging.getLogger(__name__)

REENCODE_QUALITY = 95
TAR_MTIME = 0.0  # the members' time stamp: the same folder gives byte-identical shards


@dataclass
class SplitReport:
    samples: int = 0
    shards: int = 0
    source_bytes: int = 0
    shard_bytes: int = 0
    reencoded: int = 0
    skipped: list[str] = field(default_factory=list)


def _sample_bytes(path: str, max_side: int) -> tuple[bytes, str, bool]:
    """(bytes, extension, re-encoded); the header is parsed to reject what is not an image."""
    with open(path, "rb") as f:
        raw = f.read()
    ext = os.path.splitext(path)[1][1:].lower()
    try:
        with Image.open(io.BytesIO(raw)) as im:
            if not max_side or max(im.size) <= max_side:
                return raw, ext, False
            scale = max_side / max(im.size)
            size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
            small = im.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    except Exception as e:
        raise UserError(f"shard: cannot read image {path} ({one_line(e)})") from None
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=REENCODE_QUALITY)
    return out.getvalue(), "jpg", True


def _write_split(src, split, classes, files, tmp, shard_size, max_side, skip_bad, seed) -> SplitReport:
    import webdataset as wds

    items = [(os.path.join(src, split, c, f), label) for label, (c, names) in enumerate(zip(classes, files)) for f in names]
    order = np.arange(len(items))
    if split == "train":
        order = np.random.default_rng(seed).permutation(len(items))
    os.makedirs(os.path.join(tmp, split))
    rep = SplitReport()
    with wds.ShardWriter(
        os.path.join(tmp, split, "shard-%06d.tar"), maxcount=10**9, maxsize=shard_size, verbose=0, mtime=TAR_MTIME
    ) as sink:
        for n, pos in enumerate(order.tolist()):
            path, label = items[pos]
            try:
                data, ext, reencoded = _sample_bytes(path, max_side)
            except (UserError, OSError) as e:
                if not skip_bad:
                    raise UserError(f"{e}; fix or remove it, or pass --skip-bad-images") from None
                rep.skipped.append(path)
                continue
            sink.write({"__key__": f"{pos:09d}", ext: data, "cls": label})
            rep.samples += 1
            rep.source_bytes += os.path.getsize(path)
            rep.reencoded += reencoded
            if (n + 1) % 10_000 == 0:
                log.info(f"{split}: {n + 1}/{len(items)} images ...")
    return rep


def write_shards(
    src: str,
    out: str,
    *,
    shard_size: int,
    max_side: int = 0,
    test_split: str = "test",
    skip_bad: bool = False,
    seed: int = 0,
) -> dict[str, SplitReport]:
    src, out = os.path.normpath(src), os.path.normpath(out)
    if not os.path.isdir(src):
        raise UserError(f"shard: {src} not found; give an image folder holding train/ and {test_split}/")
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"shard: --out {out} already exists and is not empty; choose a new folder")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise UserError(f"shard: --out {out}: folder {parent} does not exist")
    scans = {split: scan_classes(src, split) for split in ("train", test_split)}
    classes = scans["train"][0]
    if scans[test_split][0] != classes:
        differ = sorted(set(classes) ^ set(scans[test_split][0]))
        raise UserError(f"shard: train/ and {test_split}/ class folders differ ({differ[:5]})")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".partial", dir=parent)
    try:
        reports = {
            split: _write_split(src, split, classes, files, tmp, shard_size, max_side, skip_bad, seed)
            for split, (_, files) in scans.items()
        }
        storage, built = Storage(tmp), {}
        for split, rep in reports.items():
            names, sizes = ix.find_shards(storage, split)
            built[split] = ix.build_split(storage, names, sizes)
            rep.shards, rep.shard_bytes = len(names), sum(sizes)
        with open(os.path.join(tmp, ix.CLASSES_FILE), "w") as f:
            f.write("".join(c + "\n" for c in classes))
        for name, data in ix.to_files(ix.Index(classes, built)).items():
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.replace(tmp, out)
        os.chmod(out, 0o755)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return reports
