"""metrics.jsonl: one JSON event per line, appended and flushed as it happens.

Other ranks get the same object with `enabled=False`, so the trainer never branches on the rank.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from dist_cnn.fileio import write_text_atomic


class MetricsLog:
    """Appends one JSON object per event to metrics.jsonl, flushed so a killed run keeps its history."""

    def __init__(self, run_dir: Path | None, enabled: bool, on_error: Callable[[str, OSError], None] | None = None):
        self.enabled = enabled and run_dir is not None
        self.path = run_dir / "metrics.jsonl" if self.enabled else None
        self.history: list[dict] = []
        self.on_error = on_error  # (what, error): the run's write-error policy; None raises

    def restore(self, history: list[dict]) -> None:
        """After a resume: rewrite the file from the checkpoint, dropping events logged after it."""
        self.history = list(history)
        self.rewrite()

    def rewrite(self) -> None:
        """The whole file from the history, atomically (after a resume, or when pruning changed events)."""
        if self.enabled:
            self._guard(lambda: write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.history)))

    def write(self, record: dict) -> None:
        record = {**record, "time": time.time()}
        self.history.append(record)
        if self.enabled:
            self._guard(lambda: self._append(record))

    def _append(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def _guard(self, write) -> None:
        try:
            write()
        except OSError as e:
            if self.on_error is None:
                raise
            self.on_error("metrics.jsonl", e)
