"""The run directory: where it is, what it may already hold, and which checkpoint to resume from."""
from __future__ import annotations

import os
import time
from pathlib import Path

from . import checkpoint, distributed as D
from .config import Config
from .errors import UserError
from .models import short_name


def default_run_name(cfg: Config, environ=os.environ) -> str:
    # Restarts of the same job must find the same directory: the SLURM job id or torchrun's
    # rendezvous id are stable across requeues and elastic restarts, a timestamp is not.
    run_id = environ.get("SLURM_JOB_ID") or environ.get("TORCHELASTIC_RUN_ID", "")
    stamp = f"job{run_id}" if run_id and run_id != "none" else time.strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{short_name(cfg.model.name)}-{cfg.data.dataset}"


def restarted(environ=os.environ) -> bool:
    return int(environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0 or \
        int(environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def effective_resume(cfg: Config, environ=os.environ) -> str:
    """`none` becomes `auto` when torchrun restarted the group or SLURM requeued the job."""
    return "auto" if cfg.ckpt.resume == "none" and restarted(environ) else cfg.ckpt.resume


def prepare_run_dir(cfg: Config) -> Path:
    """Rank 0: pick and create the run directory, refusing to overwrite what is already there."""
    run_dir = Path(cfg.log.out or Path("runs") / default_run_name(cfg))
    if (run_dir / "summary.json").exists():
        raise UserError(f"--out {run_dir} already holds a finished run (summary.json); choose another --out")
    if checkpoint.list_checkpoints(run_dir) and effective_resume(cfg) == "none":
        raise UserError(f"--out {run_dir} holds checkpoints of an unfinished run: pass --resume auto to "
                        f"continue it, or choose another --out")
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} exists and is not a directory")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {run_dir}: cannot create it ({e.strerror})") from None
    return run_dir


def resolve_resume(cfg: Config, env: D.DistEnv, run_dir: Path, log) -> tuple[Path | None, dict | None]:
    """Rank 0 finds and loads the checkpoint; every rank gets its state (no shared filesystem needed)."""
    mode = effective_resume(cfg)

    def find():
        if mode == "none":
            return None
        if mode != "auto":
            return Path(mode), checkpoint.load(Path(mode))
        found = checkpoint.newest_valid(run_dir, log)
        if found is None:
            log(f"--resume auto: no checkpoint in {run_dir}, starting from scratch")
        return found

    found = D.main_only(env, find)
    return found if found is not None else (None, None)
