"""What rank 0 tells the user and writes down: metrics.jsonl events, progress, summary.json.

Other ranks get the same objects with `enabled=False`, so the trainer never branches on the rank.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


class MetricsLog:
    """Appends one JSON object per event to metrics.jsonl, flushed so a killed run keeps its history."""

    def __init__(self, run_dir: Path | None, enabled: bool):
        self.enabled = enabled and run_dir is not None
        self.path = run_dir / "metrics.jsonl" if self.enabled else None
        self.history: list[dict] = []

    def restore(self, history: list[dict]) -> None:
        """After a resume: rewrite the file from the checkpoint, dropping events logged after it."""
        self.history = list(history)
        if self.enabled:
            tmp = self.path.with_name("metrics.jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
            os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        record = {**record, "time": time.time()}
        self.history.append(record)
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Progress:
    """A tqdm bar on an interactive terminal; plain periodic lines otherwise (logs, CI, SLURM)."""

    def __init__(self, enabled: bool, show_bar: bool, total_steps: int, log_every_s: float = 10.0):
        self.enabled = enabled
        self.bar = None
        self.total = total_steps
        self.log_every_s, self.last_line = log_every_s, 0.0
        if enabled and show_bar and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True, file=sys.stderr)

    def print(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def update(self, step: int, stats: dict) -> None:
        """Called every logged step with the train event's fields."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{stats['loss']:.3f}", img_s=f"{stats['images_per_sec']:.0f}",
                                 refresh=False)
            self.bar.refresh()
        elif time.time() - self.last_line >= self.log_every_s:
            self.last_line = time.time()
            self.print(f"epoch {stats['epoch'] + 1} step {step}/{self.total} loss {stats['loss']:.4f} "
                       f"lr {stats['lr']:.4g} {stats['images_per_sec']:.0f} img/s "
                       f"({stats['images_per_sec_per_rank']:.0f}/rank) ETA {_fmt_time(stats['eta_seconds'])}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
