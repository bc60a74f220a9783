"""The hang report: when a collective times out or a peer is lost, say which rank fell behind and where.

Every rank of a distributed run publishes its phase and step (observability/phases.py) to the job's store
every few seconds, from a background thread: `dist_cnn/heartbeat/<rank>` = {"phase", "step",
"since", "time"}. When a rank's collective fails (commands: comm_failure), `report()`:
- on rank 0, reads every rank's heartbeat and returns one line naming the rank that fell behind, its
  last phase and step and how long ago it was seen ("rank 1 last seen 41 s ago in data wait at
  step 120; the others wait in the step's all_reduce");
- on every rank, writes its Python stacks to RUN_DIR/hang/rank-N.txt (the failed collective's
  traceback, then every thread's stack by faulthandler), and raises the store's `dist_cnn/hang`
  flag: ranks that are alive but not in a collective (stuck reading data) see it on their next
  heartbeat and write their stacks too.
On CUDA, NCCL's flight recorder (the last collectives of each rank) is switched on before the
process group starts (distributed/process_group.py); the report writes each rank's records to
RUN_DIR/hang/nccl-trace-rank-N.pkl (torch's own watchdog also dumps them on its timeout, to
TORCH_NCCL_DEBUG_INFO_TEMP_FILE, /tmp/nccl_trace_rank_N by default).
"""

from __future__ import annotations

import contextlib
import faulthandler
import json
import threading
import time
import traceback
from pathlib import Path

import torch

from dist_cnn.observability.phases import COLLECTIVE_PHASES, PHASES, Phases

INTERVAL_S = 2.0  # heartbeat period
SILENT_AFTER = 3  # periods without a heartbeat: the rank is stopped or frozen, not just busy
KEY = "dist_cnn/heartbeat/{}"
HANG_FLAG = "dist_cnn/hang"
DUMPED = "dist_cnn/hang/dumped/{}"


def dump_nccl_trace(path: Path) -> bool:
    """The flight recorder's records of this rank (CUDA with NCCL only), as torch pickles them."""
    if not (torch.cuda.is_available() and torch.distributed.is_nccl_available()):
        return False
    try:
        data = torch._C._distributed_c10d._dump_nccl_trace()
    except Exception:  # recorder off, or this torch has no such entry point
        return False
    path.write_bytes(data)
    return True


class Heartbeat:
    """This rank's heartbeat thread. `store`: the process group's store (None: a single process)."""

    def __init__(self, store, rank: int, world: int, run_dir: Path, phases: Phases = PHASES):
        self.store, self.rank, self.world, self.run_dir, self.phases = store, rank, world, Path(run_dir), phases
        self._stop = threading.Event()
        self._dumped = False
        self._thread = threading.Thread(target=self._run, name="dist_cnn-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        if self.store is not None and self.world > 1:
            self._publish()  # at once: a rank that never gets further is still on record
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _publish(self) -> None:
        self.store.set(KEY.format(self.rank), json.dumps({**self.phases.snapshot(), "time": time.time()}))

    def _run(self) -> None:
        while not self._stop.wait(INTERVAL_S):
            try:
                self._publish()
                if not self._dumped and self.store.check([HANG_FLAG]):
                    self.dump()  # another rank timed out: where this one is, for the report
            except Exception:  # the store went away with the job: nothing left to report to
                return

    # ---- after a failure ------------------------------------------------------------------
    def dump(self, exc: BaseException | None = None) -> Path | None:
        """This rank's Python stacks into RUN_DIR/hang/rank-N.txt."""
        self._dumped = True
        path = self.run_dir / "hang" / f"rank-{self.rank}.txt"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w") as f:
                snap = self.phases.snapshot()
                f.write(f"rank {self.rank}: {snap['phase']} at step {snap['step']}\n\n")
                if exc is not None:
                    f.write("The failed collective:\n")
                    f.write("".join(traceback.format_exception(exc)))
                    f.write("\nEvery thread:\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError:
            return None
        with contextlib.suppress(Exception):
            self.store.set(DUMPED.format(self.rank), "1")
        return path

    def heartbeats(self) -> dict[int, dict]:
        """Every rank's last heartbeat that the store holds."""
        out = {}
        for r in range(self.world):
            with contextlib.suppress(Exception):
                if self.store.check([KEY.format(r)]):
                    out[r] = json.loads(self.store.get(KEY.format(r)))
        return out

    def report(self, exc: BaseException) -> str | None:
        """After this rank's collective failed: stacks written; on rank 0, the one-line diagnosis."""
        self.stop()
        with contextlib.suppress(Exception):
            self.store.set(HANG_FLAG, str(self.rank))
        self.dump(exc)
        with contextlib.suppress(Exception):
            dump_nccl_trace(self.run_dir / "hang" / f"nccl-trace-rank-{self.rank}.pkl")
        if self.rank != 0 or self.store is None:
            return None
        try:
            beats = self.heartbeats()
            self._wait_for_stacks(beats)
        except Exception:
            return None
        return diagnose(beats, self.world, time.time(), self.run_dir, self.rank)

    def _wait_for_stacks(self, beats: dict[int, dict]) -> None:
        """Give the ranks that are alive one heartbeat and a bit to write their stacks (the store may
        go when this rank exits)."""
        alive = [r for r, b in beats.items() if r != self.rank and time.time() - b["time"] <= SILENT_AFTER * INTERVAL_S]
        end = time.time() + 2.5 * INTERVAL_S
        while alive and time.time() < end:
            alive = [r for r in alive if not self.store.check([DUMPED.format(r)])]
            time.sleep(0.1)


def diagnose(beats: dict[int, dict], world: int, now: float, run_dir: Path, reporter: int = 0) -> str:
    """One line from every rank's last heartbeat: the rank that fell behind, and where the others are.
    The reporter's own collective timed out, so it was waiting, not behind. Of the others, a rank gone
    silent (stopped, frozen) is the cause; else the one at the lowest step, preferably outside a
    collective (stuck reading data while the others wait)."""
    where = f"; stacks in {Path(run_dir) / 'hang'}"
    missing = [r for r in range(world) if r not in beats]
    if missing:
        return f"rank {missing[0]} never reported (it did not get as far as training){where}"
    silent = {r for r in beats if now - beats[r]["time"] > SILENT_AFTER * INTERVAL_S}
    candidates = [r for r in beats if r != reporter] or list(beats)
    r = min(
        candidates,
        key=lambda q: (q not in silent, beats[q]["step"], beats[q]["phase"] in COLLECTIVE_PHASES, q),
    )
    b, seen = beats[r], now - beats[r]["time"]
    text = f"rank {r} last seen {seen:.0f} s ago in {b['phase']} at step {b['step']}"
    if r not in silent:  # alive, but stuck where it is
        text += f" (there for {now - b['since']:.0f} s)"
    others = sorted({beats[o]["phase"] for o in beats if o != r})
    return text + (f"; the others wait in {' / '.join(others)}" if others else "") + where


ACTIVE: Heartbeat | None = None  # this process's, for the command's failure handler


def start(store, rank: int, world: int, run_dir: Path) -> Heartbeat:
    global ACTIVE
    ACTIVE = Heartbeat(store, rank, world, run_dir).start()
    return ACTIVE


def on_failure(exc: BaseException) -> str | None:
    """The command's hook after a lost peer or a timed-out collective."""
    if ACTIVE is None:
        return None
    return ACTIVE.report(exc)
