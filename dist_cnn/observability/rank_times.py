"""Where each rank's step time goes, every log interval, on every run.

Each rank times four parts of its steps: data wait (waiting for the next batch), forward+backward
(up to the moment its last gradient bucket is ready), communication wait (from then until the
gradients' all_reduce is done: the time spent waiting for slower peers or the network) and optimizer
(the step, its guards and the schedule). On the CPU these are host clocks; on a GPU the device parts
are CUDA events, read at the interval's end only once they have completed (event.query(), never a
synchronize), so the accounting adds no wait to any step.

The figures travel to rank 0 inside the step's vote collective (parallel.StepVote), which every
rank runs anyway: each rank fills its own slots of a vector that is zero elsewhere, so the all-ranks
max (or sum) holds every rank's figures. No extra collective.

Straggler rule: a rank's busy time (data wait + forward+backward + optimizer; communication wait is
time spent waiting for the others) 20% or more above the median rank's for 3 intervals in a row is
named in the log with the part where it loses most against the median, and a hint.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import deque

import torch

PARTS = ("data_wait", "forward_backward", "comm_wait", "optimizer")
LABELS = {
    "data_wait": "data wait",
    "forward_backward": "forward+backward",
    "comm_wait": "communication wait",
    "optimizer": "optimizer",
}
HINTS = {
    "data_wait": "more --workers or faster storage",
    "forward_backward": "a slower or busier device: check what else runs on it",
    "comm_wait": "a slower network link",
    "optimizer": "a slower or busier device: check what else runs on it",
}
SLOTS = len(PARTS) + 1  # the parts' totals (seconds) and the number of steps they cover
STRAGGLER_EXCESS = 0.20  # busy time at least 20% over the median rank's ...
STRAGGLER_INTERVALS = 3  # ... for this many intervals in a row


class RankTimes:
    """This rank's clocks. The trainer marks the step's boundaries: step_begin() after the batch
    arrived (with the wait), grads_ready() from the last bucket's comm hook, backward_done(),
    step_end(). snapshot() gives the totals since the previous snapshot for the step vote's vector."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals = dict.fromkeys(PARTS, 0.0)
        self.counts = dict.fromkeys(PARTS, 0)
        self._marks: dict[str, float | torch.cuda.Event] = {}
        self._pending: deque = deque()  # CUDA: (part, start event, end event) not yet read

    def _now(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _add(self, part: str, start, end) -> None:
        if self.cuda:
            self._pending.append((part, start, end))
        else:
            self.totals[part] += end - start
            self.counts[part] += 1

    def data_waited(self, seconds: float) -> None:
        """The host waited this long for the step's batch (a host clock on every device)."""
        self.totals["data_wait"] += seconds
        self.counts["data_wait"] += 1
        self._marks = {"begin": self._now()}

    def grads_ready(self) -> None:
        """The last gradient bucket is ready: the backward computation is done (DDP comm hook)."""
        if "begin" in self._marks:
            self._marks["ready"] = self._now()

    def backward_done(self) -> None:
        m = self._marks
        if "begin" not in m:
            return
        m["done"] = self._now()
        ready = m.get("ready", m["done"])  # no DDP: no communication to wait for
        self._add("forward_backward", m["begin"], ready)
        self._add("comm_wait", ready, m["done"])

    def step_end(self) -> None:
        if "done" in self._marks:
            self._add("optimizer", self._marks["done"], self._now())
        self._marks = {}

    def _drain(self) -> None:
        while self._pending and self._pending[0][2].query():
            part, start, end = self._pending.popleft()
            self.totals[part] += start.elapsed_time(end) / 1e3
            self.counts[part] += 1

    def snapshot(self) -> list[float]:
        """Per-step means (seconds) of each part since the previous snapshot, and the steps covered;
        the clocks start over."""
        if self.cuda:
            self._drain()
        steps = max(self.counts.values())
        means = [self.totals[p] / self.counts[p] if self.counts[p] else 0.0 for p in PARTS]
        self.totals, self.counts = dict.fromkeys(PARTS, 0.0), dict.fromkeys(PARTS, 0)
        return [*means, float(steps)]


def slots(rank: int, world: int, figures: list[float] | None) -> torch.Tensor:
    """This rank's figures in its own slots of a world x SLOTS vector, zeros elsewhere (None: all zeros)."""
    out = torch.zeros(world * SLOTS)
    if figures is not None:
        out[rank * SLOTS : (rank + 1) * SLOTS] = torch.tensor(figures)
    return out


def unpack(values: list[float], world: int) -> dict[str, list[float]] | None:
    """The reduced vector -> {"rank_<part>_ms": [per rank], "rank_step_ms": [...]}; None when no rank
    had figures (a step that closed no interval)."""
    rows = [values[r * SLOTS : (r + 1) * SLOTS] for r in range(world)]
    if not any(row[-1] for row in rows):
        return None
    out = {f"rank_{p}_ms": [round(row[i] * 1e3, 3) for row in rows] for i, p in enumerate(PARTS)}
    out["rank_step_ms"] = [round(busy(row) * 1e3, 3) for row in rows]
    return out


def rank_scalars(record: dict) -> dict[str, float]:
    """A train record's per-rank lists as scalars for W&B and TensorBoard: rank/<r>/data_wait_ms, ..."""
    return {
        f"rank/{r}/{k.removeprefix('rank_')}": v
        for k, values in record.items()
        if k.startswith("rank_") and isinstance(values, list)
        for r, v in enumerate(values)
    }


def busy(row: list[float]) -> float:
    """A rank's own time a step: everything but waiting for the others."""
    return sum(v for p, v in zip(PARTS, row) if p != "comm_wait")


class StragglerWatch:
    """Rank 0's judge of the gathered figures: a rank slow for STRAGGLER_INTERVALS intervals in a row
    is named once (again only after it recovered and fell behind once more)."""

    def __init__(self):
        self.streak: dict[int, int] = {}

    def check(self, figures: dict[str, list[float]]) -> tuple[int | None, str | None]:
        """(the straggling rank or None, the message to log now or None)."""
        step_ms = figures["rank_step_ms"]
        if len(step_ms) < 2:
            return None, None
        median = statistics.median(step_ms)
        slow = [r for r, ms in enumerate(step_ms) if median > 0 and ms >= (1 + STRAGGLER_EXCESS) * median]
        self.streak = {r: self.streak.get(r, 0) + 1 for r in slow}
        if not slow:
            return None, None
        rank = max(slow, key=lambda r: step_ms[r])
        if self.streak[rank] < STRAGGLER_INTERVALS:
            return None, None
        message = None
        if self.streak[rank] == STRAGGLER_INTERVALS:
            message = describe(rank, figures, median)
        return rank, message


def describe(rank: int, figures: dict[str, list[float]], median: float) -> str:
    """'rank 3 is 41% slower than the median: data wait 38 ms/step; more --workers or faster storage'."""
    own = [p for p in PARTS if p != "comm_wait"]

    def excess(p):
        values = figures[f"rank_{p}_ms"]
        return values[rank] - statistics.median(values)

    part = max(own, key=excess)
    slower = figures["rank_step_ms"][rank] / median - 1
    ms = figures[f"rank_{part}_ms"][rank]
    return f"rank {rank} is {slower:.0%} slower than the median: {LABELS[part]} {ms:.0f} ms/step; {HINTS[part]}"


TEST_DELAY_ENV = "DIST_CNN_TEST_SLOW_DATA"


def delayed_for_test(batches, rank: int):
    """Test only: DIST_CNN_TEST_SLOW_DATA=RANK:SECONDS makes that rank sleep before each batch, a
    slow data path for the straggler test. Not an option: unset, the batches pass through untouched."""
    spec = os.environ.get(TEST_DELAY_ENV, "")
    if not spec or int(spec.split(":")[0]) != rank:
        return batches
    seconds = float(spec.split(":")[1])

    def slow():
        for batch in batches:
            time.sleep(seconds)
            yield batch

    return slow()
