"""Preemption and time limits: a signal only sets a flag; the trainer acts at the next step boundary.

USR1 (SLURM's --signal warning before the time limit, or `scancel --signal=USR1`): checkpoint, then
requeue the job so it resumes. TERM (scancel, or a preemption that SLURM requeues itself): checkpoint
and exit without requeueing, so a job cancelled for good stays cancelled. INT (Ctrl-C): the first
checkpoints and stops like TERM; a second aborts at once (KeyboardInterrupt). Ctrl-C, scancel and a
time limit signal the whole process group: DataLoader workers ignore these signals (data/workers.py)
and leave the decision to their rank; under torchrun the agent's forwarded copy of the same Ctrl-C
(within a second) is not a second one.

A run stopped by a signal and not requeued is unfinished: it exits with 128 + the signal's number
(130 Ctrl-C, 143 SIGTERM, 138 SIGUSR1 whose requeue failed), never 0.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time

log = logging.getLogger(__name__)

INTERRUPT_NOTICE = (
    "\nCtrl-C: writing a checkpoint at the next step, then stopping (press Ctrl-C again to abort at once, without it)\n"
)


class StopSignal:
    def __init__(self, announce: bool = True):
        self.signum = 0
        self.pruned = False  # a sweep's pruner stopped the run: a finished trial, not an interruption
        self._first_interrupt = 0.0
        # Under torchrun a Ctrl-C reaches a worker twice: from the terminal (the process group) and
        # from the agent, which forwards the signal it got; the second is no second Ctrl-C.
        self.echo_seconds = 1.0 if os.environ.get("TORCHELASTIC_RUN_ID") else 0.0
        self.announce = announce  # rank 0 says what Ctrl-C does; the other ranks stay quiet
        self._previous: dict = {}

    def install(self) -> None:
        """Handle the signals, until uninstall(); only the main thread can (Ray Train runs the training
        function in another thread, and stops it itself)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for s in (signal.SIGUSR1, signal.SIGTERM):
            self._previous[s] = signal.signal(s, self._handle)
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)

    def uninstall(self) -> None:
        """The handlers from before install(): a caller's own, for whatever it runs after training."""
        while self._previous:
            s, handler = self._previous.popitem()
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def _handle(self, signum, frame):
        self.signum = self.signum or signum

    def _interrupt(self, signum, frame):
        if self.signum == signal.SIGINT:
            if time.monotonic() - self._first_interrupt < self.echo_seconds:
                return  # torchrun forwarding the terminal's Ctrl-C to its workers: the same one
            raise KeyboardInterrupt  # the second Ctrl-C: abort now
        if not self.signum:
            self._first_interrupt = time.monotonic()
        self.signum = self.signum or signum
        if self.announce:
            os.write(2, INTERRUPT_NOTICE.encode())  # not print(): a handler may interrupt a print

    def prune(self) -> None:
        self.pruned = True

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum) if self.signum else 0

    @property
    def requested(self) -> bool:
        return self.signum != 0 or self.pruned

    @property
    def wants_requeue(self) -> bool:
        return self.signum == signal.SIGUSR1


def requeue_slurm_job() -> bool:
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        log.info("stop signal received outside SLURM: checkpoint written, not requeueing")
        return False
    out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if out.returncode != 0:
        log.warning(f"warning: scontrol requeue {job} failed: {out.stderr.strip()}")
        return False
    log.info(f"requeued SLURM job {job}; it resumes from the checkpoint")
    return True
