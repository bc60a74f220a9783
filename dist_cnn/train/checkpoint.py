"""Checkpoints: assembled from components, written atomically, pruned to the last K, and the newest
valid one found to resume from.

A checkpoint is one flat dict built by assemble() from a mapping of components, each owning
state_dict()/load_state_dict() (the model, optimizer, schedule, ... and, for what is plain trainer
fields, the small classes of train.state); restore() hands each its part back. A component is stored
under its key, or, wrapped in Inline, its entries are keys of the checkpoint itself (step, epoch,
...: the layout earlier versions wrote, which keeps loading).

Written by rank 0 only (the caller makes the others wait): a temporary file in the same directory,
flushed and fsync'd, then os.replace, so a crash or a full disk never leaves a corrupt file in place
of a good one. Loaded with torch.load(weights_only=True): nothing in a checkpoint needs unpickling of
arbitrary objects (RNG states are stored as tensors, lists and ints).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import random
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from dist_cnn.config import CheckpointConfig
from dist_cnn.errors import UserError, one_line
from dist_cnn.fileio import atomic_write

log = logging.getLogger(__name__)


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> object: ...


class Inline:
    """A component whose entries are top-level keys of the checkpoint; its load_state_dict gets the
    whole checkpoint and takes its own keys."""

    def __init__(self, component: Stateful):
        self.component = component


def assemble(components: Mapping[str, Stateful | Inline]) -> dict:
    """The checkpoint dict of `components` (their state_dict(), by key or inline)."""
    state: dict = {}
    for key, part in components.items():
        entries = part.component.state_dict() if isinstance(part, Inline) else {key: part.state_dict()}
        clash = state.keys() & entries.keys()
        if clash:  # two components claiming one key: the file would keep only the last
            raise ValueError(f"checkpoint components both write {sorted(clash)}")
        state.update(entries)
    return state


def restore(state: dict, components: Mapping[str, Stateful | Inline]) -> None:
    """Load each component's part of `state` into it, in the mapping's order."""
    for key, part in components.items():
        if isinstance(part, Inline):
            part.component.load_state_dict(state)
        elif key not in state:
            raise UserError(f"the checkpoint has no {key!r} state to load")
        else:
            part.load_state_dict(state[key])


CKPT_RE = re.compile(r"step-(\d+)\.pt$")


def ckpt_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Step checkpoints, oldest first."""
    d = ckpt_dir(run_dir)
    files = [p for p in d.glob("step-*.pt") if CKPT_RE.search(p.name)] if d.is_dir() else []
    return sorted(files, key=lambda p: int(CKPT_RE.search(p.name).group(1)))


def atomic_save(obj, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f), durable=True)


# Files this process wrote or verified, (path) -> (size, mtime_ns, loadable): pruning decides on
# loadability without reading every checkpoint at every save.
_verified: dict[str, tuple[int, int, bool]] = {}


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _remember(path: Path, ok: bool) -> None:
    with contextlib.suppress(OSError):
        _verified[str(path)] = (*_stamp(path), ok)


def loadable(path: Path) -> bool:
    """Whether `path` loads as a training checkpoint (cached by size and mtime)."""
    try:
        stamp = _stamp(path)
    except OSError:
        return False
    hit = _verified.get(str(path))
    if hit is not None and hit[:2] == stamp:
        return hit[2]
    try:
        load_training(path)
        ok = True
    except UserError:
        ok = False
    _verified[str(path)] = (*stamp, ok)
    return ok


def save(run_dir: Path, state: dict, keep: int, is_best: bool) -> Path:
    """write(), returning only the new file."""
    return write(run_dir, state, keep, is_best)[0]


def write(run_dir: Path, state: dict, keep: int, is_best: bool) -> tuple[Path, list[Path]]:
    """Write step-N.pt (and best.pt), then prune; returns the new file and the files pruned.

    Pruning happens only after the new file is in place, removes unloadable step files first, and
    keeps the newest `keep` loadable ones (the new one always among them)."""
    d = ckpt_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"step-{state['step']:08d}.pt"
    atomic_save(state, path)
    _remember(path, True)
    if is_best:
        atomic_save(state, d / "best.pt")
        _remember(d / "best.pt", True)
    return path, prune(run_dir, keep, path)


def prune(run_dir: Path, keep: int, newest: Path | None = None) -> list[Path]:
    files = list_checkpoints(run_dir)
    bad = [p for p in files if not loadable(p)]
    good = [p for p in files if p not in bad and p != newest]
    slots = keep - (newest is not None)
    survivors = good[max(0, len(good) - slots) :] if slots > 0 else []
    removed = []
    for p in bad + [p for p in good if p not in survivors]:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
        _verified.pop(str(p), None)
    return removed


REQUIRED = ("model", "optimizer", "schedule", "step", "epoch", "epoch_step", "config", "rng")


def load(path: Path) -> dict:
    """torch.load(weights_only=True) of any file written by dist_cnn; one-line errors."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"checkpoint {path} is a directory, not a file") from None
    except pickle.UnpicklingError as e:
        if "global" in str(e).lower():  # weights_only met a class or function to import
            raise UserError(
                f"checkpoint {path} holds Python objects other than tensors and plain containers; "
                "refused for safety (loading them could run code; torch.load weights_only=True)"
            ) from None
        raise UserError(f"checkpoint {path} is unreadable ({one_line(e, 150)})") from None
    except Exception as e:
        raise UserError(f"checkpoint {path} is unreadable or truncated ({one_line(e, 150)})") from None


def describe(obj) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a bare tensor {tuple(obj.shape)}"
    return f"a {type(obj).__name__}"


def load_training(path: Path) -> dict:
    """A training checkpoint (step-N.pt, best.pt): refuses model.pt exports and other files in one line."""
    state = load(path)
    if not isinstance(state, dict):
        raise UserError(f"{path} holds {describe(state)}, not a dist_cnn training checkpoint")
    if "model_name" in state and "optimizer" not in state:
        raise UserError(
            f"{path} is a model export (model.pt: weights only, no optimizer or position); resume "
            "from a training checkpoint (checkpoints/step-*.pt or best.pt) instead"
        )
    missing = [k for k in REQUIRED if k not in state]
    if missing or not isinstance(state.get("config"), dict) or not isinstance(state.get("model"), dict):
        raise UserError(f"{path} is not a dist_cnn training checkpoint (missing {', '.join(missing) or 'a model'})")
    return state


def newest_valid(run_dir: Path) -> tuple[Path, dict] | None:
    """The loadable checkpoint with the highest step, best.pt included; unloadable ones are reported
    and skipped."""
    found = None
    for path in reversed(list_checkpoints(run_dir)):
        try:
            found = path, load_training(path)
            _remember(path, True)
            break
        except UserError as e:
            _remember(path, False)
            log.warning(f"warning: skipping {e}")
    best = ckpt_dir(run_dir) / "best.pt"
    if best.is_file():
        try:
            state = load_training(best)
            if found is None or state["step"] > found[1]["step"]:
                found = best, state
        except UserError as e:
            log.warning(f"warning: skipping {e}")
    return found


def check_resumable(
    state: dict, *, batch_size: int, train_size: int, steps_per_epoch: int, total_steps: int, epochs: int
) -> None:
    """Resume maps a checkpoint's position exactly or refuses: the position is (epoch, optimizer step
    in the epoch), which means the same images only with the same global batch and training set.
    World size and grad accum may change (the global batch, and so the data order, stays the same)."""
    train = state["config"].get("train", {})
    old_batch, old_size = train.get("batch_size"), state.get("train_size")
    if old_batch != batch_size:
        raise UserError(
            f"the checkpoint was trained with --batch-size {old_batch}, this run has {batch_size}: its "
            f"position in the epoch would point at other images; resume with --batch-size {old_batch} "
            "or start a new run in another --out"
        )
    if old_size is not None and old_size != train_size:
        raise UserError(
            f"the checkpoint was trained on {old_size} training images, this dataset has {train_size}: "
            "resume needs the same training set; start a new run in another --out"
        )
    step, epoch, epoch_step = state["step"], state["epoch"], state["epoch_step"]
    if epoch_step > steps_per_epoch or epoch > epochs or step > total_steps or (epoch == epochs and epoch_step > 0):
        raise UserError(
            f"the checkpoint is at step {step} (epoch {epoch + 1}, step {epoch_step} of it), past "
            f"the end of this run ({total_steps} steps, {epochs} epochs of {steps_per_epoch}); raise "
            "--epochs or --max-steps to train on, or start a new run in another --out"
        )


def scrub_missing(history: list[dict]) -> bool:
    """metrics events never name a checkpoint that is gone: a pruned file's `path` (checkpoint
    events) or `from` (resume events) is replaced by `pruned: true`. True if anything changed."""
    changed = False
    for rec in history:
        key = {"checkpoint": "path", "resume": "from"}.get(rec.get("event"))
        if key and isinstance(rec.get(key), str) and not os.path.exists(rec[key]):
            rec.pop(key)
            rec["pruned"] = True
            changed = True
    return changed


def check_compatible(state: dict, model: str, dataset: str, shapes: dict) -> None:
    cfg = state.get("config", {})
    have = (cfg.get("model", {}).get("name"), cfg.get("data", {}).get("dataset"))
    if have != (model, dataset):
        raise UserError(f"checkpoint is for model {have[0]} on {have[1]}, this run is {model} on {dataset}")
    theirs = {k: tuple(v.shape) for k, v in state["model"].items()}
    if theirs != shapes:
        diff = next(k for k in set(theirs) | set(shapes) if theirs.get(k) != shapes.get(k))
        raise UserError(
            f"checkpoint does not fit this model: {diff} is {theirs.get(diff)} there, "
            f"{shapes.get(diff)} here (another image size or class count?)"
        )


def rng_state() -> dict:
    """This process's RNG states in weights_only-loadable types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


class CheckpointPolicy:
    """When to write a checkpoint: every N steps, every M minutes (rank 0's clock, agreed by all
    ranks), and never while the loss is non-finite. Stops, new bests and the end always write one."""

    def __init__(self, cfg: CheckpointConfig):
        self.every_steps, self.every_minutes = cfg.every_steps, cfg.every_minutes
        self.last_write = time.time()

    def clock_due(self) -> bool:
        """Rank 0's view of the minute interval; the trainer makes every rank agree on it."""
        return self.every_minutes > 0 and time.time() - self.last_write >= 60 * self.every_minutes

    def periodic(self, step: int, clock_due: bool, healthy: bool) -> bool:
        by_steps = self.every_steps > 0 and step % self.every_steps == 0
        return healthy and (by_steps or clock_due)

    def written(self) -> None:
        self.last_write = time.time()
