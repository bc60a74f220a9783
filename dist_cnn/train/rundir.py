"""The run directory: where it is, what it may already hold, and which checkpoint to resume from."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import socket
import tempfile
import time
from pathlib import Path

from dist_cnn.config import Config
from dist_cnn.distributed import process_group
from dist_cnn.errors import UserError
from dist_cnn.models.registry import short_name
from dist_cnn.train import checkpoint

log = logging.getLogger(__name__)


def default_run_name(cfg: Config, environ=os.environ) -> str:
    # Restarts of the same job must find the same directory: the SLURM job id or torchrun's
    # rendezvous id are stable across requeues and elastic restarts, a timestamp is not.
    run_id = environ.get("SLURM_JOB_ID") or environ.get("TORCHELASTIC_RUN_ID", "")
    stamp = f"job{run_id}" if run_id and run_id != "none" else time.strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{short_name(cfg.model.name)}-{cfg.data.dataset}"


def restarted(environ=os.environ) -> bool:
    return (
        int(environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
        or int(environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
    )


def effective_resume(cfg: Config, environ=os.environ) -> str:
    """`none` becomes `auto` when torchrun restarted the group or SLURM requeued the job."""
    return "auto" if cfg.ckpt.resume == "none" and restarted(environ) else cfg.ckpt.resume


LOCK_NAME = ".dist_cnn.lock"  # also the mark of a dist_cnn run directory
_locks: dict[str, int] = {}  # run directory -> the open lock file, held until the process ends


def _drop_inherited_locks() -> None:
    """In a forked child (a DataLoader worker, say): let go of the parent's lock files. An flock
    belongs to the open file, which a fork shares: a worker that outlives its dead rank by the seconds
    it takes to notice would otherwise keep the run directory locked against its own resume."""
    for fd in _locks.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    _locks.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)
STALE_TMP = re.compile(r"(^\..+\.tmp\d*$)|(^[^.].*\.tmp$)|(^\.tmp-)")  # atomic writes' temporaries


def is_run_dir(run_dir: Path) -> bool:
    """Ours: it holds the lock file every run writes, or (runs from before the lock) config.json and
    metrics.jsonl."""
    return (run_dir / LOCK_NAME).is_file() or (
        (run_dir / "config.json").is_file() and (run_dir / "metrics.jsonl").is_file()
    )


def lock_run_dir(run_dir: Path) -> None:
    """An exclusive flock on the run directory's lock file for the rest of this process's life.

    The kernel drops it when the process ends, however it ends, so a restarted or requeued run is
    never blocked by its dead predecessor; a second live run fails at once, naming the holder."""
    key = os.path.realpath(run_dir)
    if key in _locks:
        return
    path = run_dir / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"--out {run_dir}: cannot write there ({e.strerror})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
        os.close(fd)
        raise UserError(
            f"--out {run_dir} is in use by another run ({holder}); wait for it to end or choose another --out"
        ) from None
    except OSError:  # a filesystem without locks (some NFS setups): go on unlocked rather than not at all
        pass
    _locks[key] = fd


def claim_run_dir(run_dir: Path) -> None:
    """Under the lock, once the run may start: name this process as the holder, and prove that the
    directory takes writes (a read-only mount or an immutable directory fails here, not mid-run)."""
    fd = _locks[os.path.realpath(run_dir)]
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode(), 0)
        tempfile.NamedTemporaryFile(dir=run_dir, prefix=".probe", suffix=".tmp").close()
    except OSError as e:
        raise UserError(f"--out {run_dir}: cannot write there ({e.strerror})") from None


def unlock_run_dir(run_dir: Path) -> None:
    fd = _locks.pop(os.path.realpath(run_dir), None)
    if fd is not None:
        os.close(fd)


def clean_stale_temporaries(run_dir: Path) -> list[Path]:
    """Temporary files of atomic writes that a killed run left behind. Only called under the lock, so
    no live writer owns them."""
    removed = []
    for d in (run_dir, checkpoint.ckpt_dir(run_dir)):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if STALE_TMP.match(p.name) and p.is_file():
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p)
    return removed


def _has_checkpoints(run_dir: Path) -> bool:
    return bool(checkpoint.list_checkpoints(run_dir)) or (checkpoint.ckpt_dir(run_dir) / "best.pt").is_file()


def prepare_run_dir(cfg: Config) -> Path:
    """Rank 0, before any data is loaded: pick the run directory, refuse what must not be touched,
    lock it for this run's whole life and clean what a killed predecessor left."""
    run_dir = Path(cfg.log.out or Path("runs") / default_run_name(cfg))
    resume = effective_resume(cfg)
    if resume not in ("none", "auto") and not Path(resume).is_file():
        raise UserError(f"--resume {resume}: no such checkpoint file")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} exists and is not a directory")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not is_run_dir(run_dir):
        raise UserError(
            f"--out {run_dir} is not empty and is not a dist_cnn run directory (it has no {LOCK_NAME}); "
            "choose a new or empty directory so nothing in it is overwritten"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {run_dir}: cannot create it ({e.strerror})") from None
    lock_run_dir(run_dir)  # before looking inside: another live run is the first thing to report
    if (run_dir / "summary.json").exists():
        raise UserError(f"--out {run_dir} already holds a finished run (summary.json); choose another --out")
    if _has_checkpoints(run_dir) and resume == "none":
        raise UserError(
            f"--out {run_dir} holds checkpoints of an unfinished run: pass --resume auto to "
            f"continue it, or choose another --out"
        )
    claim_run_dir(run_dir)
    for p in clean_stale_temporaries(run_dir):
        log.info(f"removed {p}, left by a run that was killed while writing it")
    return run_dir


def resolve_resume(cfg: Config, env: process_group.DistEnv, run_dir: Path) -> tuple[Path | None, dict | None]:
    """Rank 0 finds and loads the checkpoint; every rank gets its state (no shared filesystem needed).
    A run that starts from scratch starts its metrics.jsonl afresh (a predecessor killed before its
    first checkpoint left events that belong to no checkpoint)."""
    mode = effective_resume(cfg)

    def find():
        found = None
        if mode == "auto":
            found = checkpoint.newest_valid(run_dir)
            if found is not None:
                log.info(f"--resume auto: taking {found[0]} (step {found[1]['step']}), the newest loadable checkpoint")
            else:
                log.info(f"--resume auto: no loadable checkpoint in {run_dir}, starting from scratch")
        elif mode != "none":
            found = Path(mode), checkpoint.load_training(Path(mode))
        if found is None:
            with contextlib.suppress(FileNotFoundError):
                (run_dir / "metrics.jsonl").unlink()
        return found

    found = process_group.rank0_only(env, find)
    return found if found is not None else (None, None)
