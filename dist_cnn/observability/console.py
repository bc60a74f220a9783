"""The console: the `dist_cnn` logger hierarchy printed as plain lines on stdout, rank 0 at INFO.

Every module logs to `logging.getLogger(__name__)`, under the `dist_cnn` logger. configure() (the
command line, and every training run however it starts: train.py, torchrun, fit(), Ray Train workers)
sets that logger's level and, unless the application put a handler on it itself, gives it one handler
that writes each message alone (no level, no logger name) to stdout, flushed. The root logger is never
touched, so a notebook's own logging configuration stays as it was.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

LOGGER = "dist_cnn"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConsoleHandler(logging.StreamHandler):
    """A StreamHandler on whatever sys.stdout is when a record arrives: a notebook or a test that
    replaces sys.stdout after configure() still gets the lines."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass  # always the current sys.stdout


def level_for(rank: int, level: str = "INFO") -> int:
    """Rank 0 logs at `level`; every other rank at the stricter of `level` and WARNING, so a note
    that all ranks reach is printed once while each rank's own warnings still show."""
    number = logging.getLevelName(level.upper())
    if not isinstance(number, int):
        raise ValueError(f"unknown log level {level!r} (one of {', '.join(LEVELS)})")
    return number if rank == 0 else max(number, logging.WARNING)


def launch_rank(environ=os.environ) -> tuple[int, int]:
    """(rank, world size) as the launcher set them (torchrun, srun); (0, 1) when they are absent or broken
    (the launch checks report a broken environment; the console must not fail on it)."""
    rank = environ.get("RANK", environ.get("SLURM_PROCID", "0"))
    world = environ.get("WORLD_SIZE", environ.get("SLURM_NTASKS", "1"))
    if not (rank.isdigit() and world.isdigit()):
        return 0, 1
    return int(rank), int(world)


def configure(level: str = "INFO", rank: int | None = None, world_size: int | None = None) -> logging.Logger:
    """The `dist_cnn` logger at `level` on rank 0 (level_for elsewhere), printing to stdout. A rank
    other than 0 in a group of several prefixes its lines with "[rank N] ", as its error lines are.
    Calling it again only changes the level and prefix."""
    if rank is None:
        rank, world_size = launch_rank()
    world_size = world_size or 1
    logger = logging.getLogger(LOGGER)
    logger.setLevel(level_for(rank, level))
    ours = [h for h in logger.handlers if isinstance(h, ConsoleHandler)]
    if logger.handlers and not ours:
        return logger  # the application's own handlers: records go there, as it arranged
    handler = ours[0] if ours else ConsoleHandler()
    prefix = f"[rank {rank}] " if rank and world_size > 1 else ""
    handler.setFormatter(logging.Formatter(prefix + "%(message)s"))
    if not ours:
        logger.addHandler(handler)
    logger.propagate = False  # our handler prints them; the root's handlers would print them twice
    return logger


def around_bar():
    """While a tqdm bar is drawn, console lines are written above it (tqdm.write) instead of through it."""
    logger = logging.getLogger(LOGGER)
    if not any(isinstance(h, ConsoleHandler) for h in logger.handlers):
        return contextlib.nullcontext()
    from tqdm.contrib.logging import logging_redirect_tqdm

    return logging_redirect_tqdm([logger])
