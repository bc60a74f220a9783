"""What an engine that runs the trainer (Ray Train) hears from it: every metrics record and every
checkpoint, on every rank at the same points of the run (such engines synchronize the ranks on each
report). The default hears nothing; dist_cnn/ray.py has the Ray one."""

from __future__ import annotations

from pathlib import Path


class Reporter:
    def run_dir_ready(self, run_dir: Path, is_rank0: bool) -> None:
        """The run directory is settled (rank 0 made, locked and checked it); nothing is written yet."""

    def metrics(self, record: dict) -> None:
        """A train or eval record of metrics.jsonl; every rank's own."""

    def checkpoint(self, path: Path | None, record: dict) -> None:
        """A checkpoint was written: its file on rank 0 (None on the others, and when the write failed);
        the record names its step, and the final one carries the run's summary."""
