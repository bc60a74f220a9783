"""Read an offline W&B run back from disk, for tests.

An offline run is a directory `<run_dir>/wandb/offline-run-<time>-<id>[-N]/` holding
`run-<id>.wandb`: a LevelDB-style log of `wandb.proto.wandb_internal_pb2.Record` protobufs,
the same file `wandb sync` uploads.

The installed wandb (0.2x+) no longer ships a Python reader (`wandb.sdk.internal.datastore`
was removed when `wandb sync` moved into the Go `wandb-core`), so the framing is read here,
following the format wandb's old `DataStore` documented:

    file   := header block*           header := ident ":W&B" (4) | magic 0xBEE1 (u16 LE) | version 0 (u8)
    block  := record* trailer?        (32768-byte blocks; the file header counts in the first one)
    record := crc (u32 LE) | length (u16 LE) | type (u8: FULL=1 FIRST=2 MIDDLE=3 LAST=4) | data
    crc    := zlib.crc32(data, zlib.crc32(bytes([type])))
    a block tail shorter than a record header is zero padding.

The payloads are then parsed with wandb's own protobuf classes.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

_HEADER_LEN = 7
_BLOCK_LEN = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
_CRC_SEED = {t: zlib.crc32(bytes([t])) & 0xFFFFFFFF for t in (_FULL, _FIRST, _MIDDLE, _LAST)}


def iter_payloads(path: Path):
    """Yield the raw record payloads of one .wandb file; stops quietly at a truncated tail."""
    data = Path(path).read_bytes()
    if len(data) < _HEADER_LEN:
        raise ValueError(f"{path}: too short for a W&B log header")
    ident, magic, version = struct.unpack("<4sHB", data[:_HEADER_LEN])
    if ident != b":W&B" or magic != 0xBEE1 or version != 0:
        raise ValueError(f"{path}: not a W&B transaction log (header {data[:_HEADER_LEN]!r})")
    pos = _HEADER_LEN
    pending: bytes | None = None
    while pos < len(data):
        space_left = _BLOCK_LEN - pos % _BLOCK_LEN
        if space_left < _HEADER_LEN:  # block trailer: zero padding
            pos += space_left
            continue
        if pos + _HEADER_LEN > len(data):
            return  # truncated record header
        crc, length, rtype = struct.unpack("<IHB", data[pos : pos + _HEADER_LEN])
        if crc == 0 and length == 0 and rtype == 0:  # zero-filled rest of a block
            pos += space_left
            continue
        body = data[pos + _HEADER_LEN : pos + _HEADER_LEN + length]
        if len(body) < length:
            return  # truncated record (a run still writing, or killed)
        if rtype not in _CRC_SEED or zlib.crc32(body, _CRC_SEED[rtype]) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: corrupt record at byte {pos}")
        pos += _HEADER_LEN + length
        if rtype == _FULL:
            pending = None
            yield body
        elif rtype == _FIRST:
            pending = body
        elif pending is not None:
            pending += body
            if rtype == _LAST:
                yield pending
                pending = None


def read_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    records = []
    for payload in iter_payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _item_value(item):
    """A HistoryItem / SummaryItem / ConfigItem value as Python data."""
    kind = item.WhichOneof("value") if any(o.name == "value" for o in item.DESCRIPTOR.oneofs) else None
    if kind == "none":
        return None
    if kind in ("boolean", "integer", "number", "text"):
        return getattr(item, kind)
    if kind == "json":
        return json.loads(item.json)
    return json.loads(item.value_json) if item.value_json else None


def _put(target: dict, item, value) -> None:
    """Store an item's value; nested_key (a dict value wandb split into leaves) becomes nested dicts."""
    keys = list(item.nested_key) or [item.key]
    for k in keys[:-1]:
        if not isinstance(target.get(k), dict):
            target[k] = {}
        target = target[k]
    target[keys[-1]] = value


def _pop(target: dict, item) -> None:
    keys = list(item.nested_key) or [item.key]
    for k in keys[:-1]:
        target = target.get(k)
        if not isinstance(target, dict):
            return
    target.pop(keys[-1], None)


def read_offline_file(path: Path) -> dict:
    """One .wandb file -> {'run_id', 'resume', 'history', 'summary', 'config', 'record_types', 'path'}."""
    out: dict = {
        "path": Path(path),
        "run_id": None,
        "resume": None,
        "history": [],
        "summary": {},
        "config": {},
        "record_types": {},
    }
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        out["record_types"][kind] = out["record_types"].get(kind, 0) + 1
        if kind == "run":
            out["run_id"] = record.run.run_id
            out["resume"] = bool(record.run.resume)  # the init asked to resume (resume="allow")
            for item in record.run.config.update:
                _put(out["config"], item, _item_value(item))
        elif kind == "config":
            for item in record.config.update:
                _put(out["config"], item, _item_value(item))
        elif kind == "history":
            row: dict = {}
            for item in record.history.item:
                _put(row, item, _item_value(item))
            if record.history.HasField("step") and "_step" not in row:
                row["_step"] = record.history.step.num
            out["history"].append(row)
        elif kind == "summary":
            for item in record.summary.update:
                _put(out["summary"], item, _item_value(item))
            for item in record.summary.remove:
                _pop(out["summary"], item)
    return out


def offline_run_dirs(run_dir: Path) -> list[Path]:
    """The offline-run-* directories under run_dir/wandb, oldest first."""
    base = Path(run_dir) / "wandb"
    return sorted(p for p in base.glob("offline-run-*") if p.is_dir()) if base.is_dir() else []


def read_offline_run(run_dir: Path) -> dict:
    """All offline-run segments under run_dir/wandb, merged in time order.

    Each wandb.init writes its own offline-run dir, so a resumed run (same id) is a second dir.
    Returns {'run_id', 'run_ids' (one per segment), 'history' (rows, each with '_step'),
    'summary' (later segments override), 'config', 'segments' (per-file results)}.
    """
    segments = []
    for d in offline_run_dirs(run_dir):
        for f in sorted(d.glob("run-*.wandb")):
            segments.append(read_offline_file(f))
    if not segments:
        raise FileNotFoundError(f"no offline W&B run under {Path(run_dir) / 'wandb'}")
    merged: dict = {
        "run_ids": [s["run_id"] for s in segments],
        "history": [],
        "summary": {},
        "config": {},
        "segments": segments,
    }
    merged["run_id"] = segments[-1]["run_id"]
    for s in segments:
        merged["history"].extend(s["history"])
        merged["summary"].update(s["summary"])
        merged["config"].update(s["config"])
    return merged
