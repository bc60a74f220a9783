"""Where this rank is in the training loop: one phase at a time, with the step it belongs to.

The trainer marks each transition (`PHASES.enter(DATA_WAIT, step)`); readers take what they need:
the hang report (observability/hang.py) publishes the current phase to the job's store, and
`totals` holds the seconds spent in each phase (per-rank time accounting). A mark is two attribute
writes and a clock read: cheap enough for every step.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import defaultdict

SETUP = "setup"
DATA_WAIT = "data wait"
FORWARD = "forward"
BACKWARD = "backward and the gradient all_reduce"  # DDP overlaps them; the rank waits for peers here
STEP_ALL_REDUCE = "the step's all_reduce"  # the small agreement every step ends with
OPTIMIZER = "optimizer step"
CHECKPOINT = "checkpoint write"
EVALUATION = "evaluation"
DONE = "done"
# Where a rank waits for its peers (DDP's forward syncs too): a rank stuck elsewhere fell behind.
COLLECTIVE_PHASES = frozenset({FORWARD, BACKWARD, STEP_ALL_REDUCE, CHECKPOINT, EVALUATION})


class Phases:
    def __init__(self):
        self._lock = threading.Lock()
        self.phase, self.step, self.since = SETUP, 0, time.time()
        self.totals: dict[str, float] = defaultdict(float)

    def enter(self, phase: str, step: int | None = None) -> None:
        now = time.time()
        with self._lock:
            self.totals[self.phase] += now - self.since
            self.phase, self.since = phase, now
            if step is not None:
                self.step = step

    @contextlib.contextmanager
    def during(self, phase: str, step: int | None = None):
        """`phase` for the block, then back to the phase it interrupted."""
        before = self.phase
        self.enter(phase, step)
        try:
            yield
        finally:
            self.enter(before)

    def snapshot(self) -> dict:
        """{"phase", "step", "since"}: a consistent view, from any thread."""
        with self._lock:
            return {"phase": self.phase, "step": self.step, "since": self.since}


PHASES = Phases()  # this process's: one rank per process
