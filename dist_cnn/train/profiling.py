"""`--profile START:END`: torch.profiler over optimizer steps START..END-1 (0-based, as a Python slice).

Every rank writes a Chrome trace, `profile/rank<R>.json` in the run directory (open it in Perfetto,
ui.perfetto.dev, or chrome://tracing). Rank 0 prints where the step time went, as wall-clock shares of
the profiled steps: each moment of the window is counted once, for the first of these that was
running: data wait, optimizer, compute (forward/backward ops, GPU kernels on CUDA), communication
(collectives not hidden behind compute), other (Python, launch overhead, idle). Then the top ops.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from dist_cnn.errors import UserError

log = logging.getLogger(__name__)

PREFIX = "dist_cnn/"
CATEGORIES = ("data wait", "optimizer", "compute", "communication", "other")
_COMM = (
    "all_reduce",
    "allreduce",
    "broadcast",
    "all_gather",
    "allgather",
    "reduce_scatter",
    "nccl:",
    "gloo:",
    "c10d::",
    "ncclDevKernel",
    "ncclKernel",
)


def parse_range(spec: str) -> tuple[int, int] | None:
    """'START:END' -> (START, END) with 0 <= START < END; '' -> None."""
    if not spec:
        return None
    try:
        start, end = (int(s) for s in spec.split(":"))
    except ValueError:
        raise UserError(f"--profile must be START:END (optimizer steps, e.g. 10:15), got {spec!r}") from None
    if not 0 <= start < end:
        raise UserError(f"--profile {spec}: need 0 <= START < END")
    return start, end


def category(name: str) -> str | None:
    if name.startswith(PREFIX + "data_wait"):
        return "data wait"
    if name.startswith(("Optimizer.step", "Optimizer.zero_grad", PREFIX + "optimizer")):
        return "optimizer"
    if any(k in name for k in _COMM):
        return "communication"
    if (
        name.startswith(("aten::", "autograd::", "torch::autograd", "void ", "at::"))
        or "Backward" in name
        or "kernel" in name.lower()
        or "gemm" in name.lower()
        or "conv" in name.lower()
    ):
        return "compute"
    return None


def split_step_time(events: list[tuple[str, float, float]], wall: tuple[float, float]) -> dict[str, float]:
    """events: (name, start_us, end_us). Each moment of `wall` goes to the first category of
    CATEGORIES that covers it; returns the share of each category (they sum to 1)."""
    by_cat = {c: [] for c in CATEGORIES[:-1]}
    for name, s, e in events:
        c = category(name)
        if c is not None and e > s:
            by_cat[c].append((s, e))
    free, shares = [wall], {}
    for c in CATEGORIES[:-1]:
        mine = _merge(by_cat[c])
        shares[c] = _length(_intersect(free, mine))
        free = _subtract(free, mine)
    shares["other"] = _length(free)
    total = max(wall[1] - wall[0], 1e-9)
    return {c: v / total for c, v in shares.items()}


def _merge(iv):
    out = []
    for s, e in sorted(iv):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def _length(iv) -> float:
    return sum(e - s for s, e in iv)


def _intersect(a, b):
    """Both sorted and disjoint."""
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if s < e:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _subtract(a, b):
    """a minus b, both sorted and disjoint."""
    out, j = [], 0
    for s, e in a:
        while j < len(b) and b[j][1] <= s:
            j += 1
        k = j
        while k < len(b) and b[k][0] < e:
            if b[k][0] > s:
                out.append((s, b[k][0]))
            s, k = max(s, b[k][1]), k + 1
        if s < e:
            out.append((s, e))
    return out


class StepProfiler:
    """The trainer calls start(step) before and stop(step) after every optimizer step, and region()
    around the parts it wants named in the trace; all three cost nothing outside the window."""

    def __init__(self, spec: str, run_dir: Path | None, rank: int, device: torch.device, with_stack: bool):
        self.window = parse_range(spec)
        self.run_dir, self.rank, self.device, self.with_stack = run_dir, rank, device, with_stack
        self.prof, self.steps = None, 0

    @property
    def active(self) -> bool:
        return self.prof is not None

    def region(self, name: str):
        return record_function(PREFIX + name) if self.prof is not None else contextlib.nullcontext()

    def start(self, step: int) -> None:
        if self.window and step == self.window[0] and self.prof is None:
            if self.device.type == "cpu":  # else kineto logs a failed GPU probe as an ERROR line
                os.environ.setdefault("KINETO_LOG_LEVEL", "5")
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.prof = profile(activities=activities, with_stack=self.with_stack, record_shapes=False)
            self.prof.__enter__()
            self.steps = 0

    def end(self, step: int) -> None:
        """Training is over at `step`: a window still open ends here; one past the end says so."""
        if self.window and self.prof is None and step <= self.window[0] and self.rank == 0:
            log.info(
                f"--profile {self.window[0]}:{self.window[1]}: training ended after {step} steps, before "
                "the window started; nothing was recorded"
            )
        elif self.prof is not None and step < self.window[1] and self.rank == 0:
            log.info(f"--profile: training ended at step {step}, inside the window; the trace stops there")
        self.stop(step, force=True)

    def stop(self, step: int, force: bool = False) -> None:
        """step: optimizer steps done so far. Ends the window at END (or, with force, wherever it is)."""
        if self.prof is None:
            return
        self.steps += not force
        if step < self.window[1] and not force:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        self._write(prof)

    def _write(self, prof) -> None:
        out = Path(self.run_dir or ".") / "profile"
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"rank{self.rank}.json"
        prof.export_chrome_trace(str(path))
        if self.rank != 0:
            return
        events = trace_events(path)
        steps = [e for e in events if e[0].startswith(PREFIX + "step")]
        wall = (
            (min(s for _, s, _ in steps), max(e for _, _, e in steps))
            if steps
            else (min(s for _, s, _ in events), max(e for _, _, e in events))
        )
        shares = split_step_time(events, wall)
        per_step = (wall[1] - wall[0]) / 1e3 / max(1, self.steps)
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        table = prof.key_averages().table(sort_by=sort, row_limit=10, max_name_column_width=48)
        summary = {
            "steps": self.steps,
            "window": list(self.window),
            "step_ms": per_step,
            "split": shares,
            "trace": str(path),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log.info(
            f"profile of steps {self.window[0]}:{self.window[1]} ({self.steps} steps, {per_step:.1f} ms a step), "
            f"trace per rank in {out}:\n  "
            + "   ".join(f"{c} {v:.1%}" for c, v in shares.items())
            + "\ntop ops:\n"
            + table
        )


def trace_events(path: Path) -> list[tuple[str, float, float]]:
    """(name, start_us, end_us) of the complete events ("ph": "X") of a Chrome trace."""
    data = json.loads(Path(path).read_text())
    return [
        (e["name"], float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)))
        for e in data.get("traceEvents", [])
        if e.get("ph") == "X" and "ts" in e
    ]
