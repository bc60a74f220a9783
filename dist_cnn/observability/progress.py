"""Training progress: a tqdm bar on an interactive terminal, plain periodic lines otherwise (logs, CI, SLURM).

Other ranks get the same object with `enabled=False`, so the trainer never branches on the rank. The
lines go to the `dist_cnn` logger (observability.console); while the bar is drawn they are written above it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time

from dist_cnn.observability import console
from dist_cnn.observability.format import duration

log = logging.getLogger(__name__)


class Progress:
    """A tqdm bar on an interactive terminal; plain periodic lines otherwise (logs, CI, SLURM)."""

    def __init__(self, enabled: bool, show_bar: bool, total_steps: int, log_every_s: float = 10.0):
        self.enabled = enabled
        self.bar = None
        self.total = total_steps
        self.log_every_s, self.last_line = log_every_s, 0.0
        self.redirect = contextlib.ExitStack()
        if enabled and show_bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, file=sys.stderr)
            self.redirect.enter_context(console.around_bar())

    def update(self, step: int, stats: dict) -> None:
        """Called every logged step with the train event's fields."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{stats['loss']:.3f}", img_s=f"{stats['images_per_sec']:.0f}", refresh=False)
            self.bar.refresh()
        elif time.time() - self.last_line >= self.log_every_s:
            self.last_line = time.time()
            log.info(
                f"epoch {stats['epoch'] + 1} step {step}/{self.total} loss {stats['loss']:.4f} "
                f"lr {stats['lr']:.4g} {stats['images_per_sec']:.0f} img/s "
                f"({stats['images_per_sec_per_rank']:.0f}/rank) ETA {duration(stats['eta_seconds'])}"
            )

    def close(self) -> None:
        self.redirect.close()
        if self.bar is not None:
            self.bar.close()


class RateAverage:
    """An exponential average of a throughput (images/s) for the ETA: one slow interval (a checkpoint
    write, a busy node) moves it by at most `weight` of the rate, where the interval's own rate would
    have multiplied the ETA."""

    def __init__(self, weight: float = 0.2):
        self.weight, self.value = weight, None

    def update(self, rate: float) -> float:
        self.value = rate if self.value is None else (1 - self.weight) * self.value + self.weight * rate
        return self.value
