"""Atomic checkpoints, keep-last-K pruning, and finding the newest valid one to resume from.

Written by rank 0 only (the caller makes the others wait): a temporary file in the same directory,
flushed and fsync'd, then os.replace, so a crash or a full disk never leaves a corrupt file in place
of a good one. Loaded with torch.load(weights_only=True): nothing in a checkpoint needs unpickling of
arbitrary objects (RNG states are stored as tensors, lists and ints).
"""
from __future__ import annotations

import random
import re
import time
from pathlib import Path

import numpy as np
import torch

from .config import CheckpointConfig
from .errors import UserError, one_line
from .fileio import atomic_write

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


def save(run_dir: Path, state: dict, keep: int, is_best: bool) -> Path:
    """Write step-N.pt (and best.pt), then prune to the newest `keep`; pruning only after success."""
    d = ckpt_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"step-{state['step']:08d}.pt"
    atomic_save(state, path)
    if is_best:
        atomic_save(state, d / "best.pt")
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {path}") from None
    except Exception as e:
        raise UserError(f"checkpoint {path} is unreadable or not a dist_cnn checkpoint "
                        f"(loaded with weights_only=True): {one_line(e)[:200]}") from None


def newest_valid(run_dir: Path, log) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads; a truncated or corrupt one is reported and skipped."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load(path)
        except UserError as e:
            log(f"warning: skipping {e}")
    return None


def check_compatible(state: dict, model: str, dataset: str, shapes: dict) -> None:
    cfg = state.get("config", {})
    have = (cfg.get("model", {}).get("name"), cfg.get("data", {}).get("dataset"))
    if have != (model, dataset):
        raise UserError(f"checkpoint is for model {have[0]} on {have[1]}, this run is {model} on {dataset}")
    theirs = {k: tuple(v.shape) for k, v in state["model"].items()}
    if theirs != shapes:
        diff = next(k for k in set(theirs) | set(shapes) if theirs.get(k) != shapes.get(k))
        raise UserError(f"checkpoint does not fit this model: {diff} is {theirs.get(diff)} there, "
                        f"{shapes.get(diff)} here (another image size or class count?)")


def rng_state() -> dict:
    """This process's RNG states in weights_only-loadable types."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
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
