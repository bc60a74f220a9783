"""Atomic file writes: readers (other ranks, a resumed run, a user) see the old file or the new one,
never a half-written one, even when the process is killed or the disk fills up mid-write.

A user's --output (predict, eval, export) follows one rule (`check_output`, `write_output`): a
regular file (or a new one) is replaced atomically; a symlink's target is, the link stays; a FIFO or
a character device (/dev/stdout, /dev/null, a terminal) is written into directly, never replaced;
`-` is standard output; a directory, a block device or a socket is refused; and so is an output that
is one of the command's input files."""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from dist_cnn.errors import UserError, one_line

log = logging.getLogger(__name__)


def atomic_write(path: Path, write: Callable[[BinaryIO], None], *, durable: bool = False) -> None:
    """write(f) into a temporary file beside `path`, then rename it over `path`.

    durable: fsync the file and the directory, so the new file survives a power loss or a node crash
    (checkpoints); without it the rename is still atomic for every reader of this machine.
    Every failure is an OSError, torch.save's RuntimeError on a full disk included, so that callers
    apply one write-error policy; the temporary file is removed.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                write(f)
            except RuntimeError as e:  # torch's PytorchStreamWriter "file write failed" (ENOSPC, EIO, quota)
                raise OSError(errno.EIO, f"write failed ({one_line(e, 120)})") from None
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's file is private; others sharing the run or the data may read it
        os.replace(tmp, path)
        if durable:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


STDOUT = "-"


def _stream_target(path: str) -> bool:
    """Whether `path` (after symlinks) is a FIFO or a character device: written into, never replaced."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)


def check_output(path: str, inputs=(), flag: str = "--output") -> None:
    """Before any work: `path` can be written under the output rule (module docstring) and is not
    one of `inputs` (files or folders the command reads). One-line UserError otherwise."""
    if path == STDOUT:
        return
    real = os.path.realpath(path)
    if os.path.exists(real):
        mode = os.stat(real).st_mode
        if stat.S_ISDIR(mode):
            raise UserError(f"{flag} {path} is a directory")
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
            raise UserError(f"{flag} {path} is not a regular file, a FIFO or a character device")
        for given in inputs:
            if os.path.exists(given) and os.path.samefile(real, given):
                raise UserError(f"{flag} {path} is one of the inputs ({given}); choose another file")
    elif not os.path.isdir(os.path.dirname(real) or "."):
        raise UserError(f"{flag} {path}: folder {os.path.dirname(real)} does not exist")


def write_output(path: str, data: bytes) -> None:
    """`data` to a user's output path under the output rule (module docstring); OSError on failure."""
    if path == STDOUT:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    real = os.path.realpath(path)  # a symlink: its target is replaced, the link stays
    if _stream_target(real):
        with open(real, "wb") as f:
            f.write(data)
        return
    atomic_write(Path(real), lambda f: f.write(data))


def write_text_atomic(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def write_json_atomic(path: Path, data) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


class WritePolicy:
    """--on-write-error for every file of the run directory (checkpoints, metrics.jsonl, config.json,
    model.pt, summary.json, plots): `continue` warns once per file and goes on, `stop` ends the run
    (exit code 1) at the next point where all ranks agree (`pending` holds the reason until then)."""

    def __init__(self, mode: str):
        self.mode = mode
        self.pending: str | None = None
        self._warned: set[str] = set()

    def failed(self, what: str, e: BaseException) -> None:
        why = getattr(e, "strerror", None) or one_line(e, 160)
        if self.mode == "stop":
            self.pending = self.pending or f"{what} could not be written ({why}); stopping (--on-write-error stop)"
        elif what not in self._warned:
            self._warned.add(what)
            log.warning(f"warning: {what} could not be written ({why}); going on (--on-write-error continue)")

    def attempt(self, what: str, write: Callable[[], None]) -> bool:
        """write(); False when it failed (the failure is handled by the policy)."""
        if self.pending:
            return False  # stopping: nothing more is written
        try:
            write()
            return True
        except OSError as e:
            self.failed(what, e)
            return False
