"""Preemption and time limits: a signal only sets a flag; the trainer acts at the next step boundary.

USR1 (SLURM's --signal warning before the time limit, or `scancel --signal=USR1`): checkpoint, then
requeue the job so it resumes. TERM (scancel, or a preemption that SLURM requeues itself): checkpoint
and exit without requeueing, so a job cancelled for good stays cancelled.
"""
from __future__ import annotations

import os
import signal
import subprocess


class StopSignal:
    def __init__(self):
        self.signum = 0

    def install(self) -> None:
        for s in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        self.signum = self.signum or signum

    @property
    def requested(self) -> bool:
        return self.signum != 0

    @property
    def wants_requeue(self) -> bool:
        return self.signum == signal.SIGUSR1


def requeue_slurm_job(log) -> bool:
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        log("stop signal received outside SLURM: checkpoint written, not requeueing")
        return False
    out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if out.returncode != 0:
        log(f"warning: scontrol requeue {job} failed: {out.stderr.strip()}")
        return False
    log(f"requeued SLURM job {job}; it resumes from the checkpoint")
    return True
