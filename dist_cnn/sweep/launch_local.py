"""--launch local: each trial a torchrun of N processes on this machine, K trials at once, each on its
own share of the devices (CUDA_VISIBLE_DEVICES split between the trials; on the CPU, the cores).

A trial's torchrun gets SIGTERM when the driver dies, however it dies (Linux: PR_SET_PDEATHSIG), so
a killed driver leaves no orphan training: the workers checkpoint and stop, and the driver started
again resumes them.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from dist_cnn.errors import UserError
from dist_cnn.sweep.trialfiles import TRIAL_ENV, TrialFiles

PR_SET_PDEATHSIG = 1
LOCK_NAME = ".dist_cnn.lock"  # the run directory's lock, held by a live run's rank 0


@dataclass
class Slot:
    cores: list[int]
    gpus: list[str]


def visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


def make_slots(parallel: int, procs: int, gpus: list[str] | None = None, cores: list[int] | None = None):
    """K disjoint shares of the machine; on GPUs, N GPUs per trial."""
    gpus = visible_gpus() if gpus is None else gpus
    cores = sorted(os.sched_getaffinity(0)) if cores is None else cores
    if gpus and len(gpus) < parallel * procs:
        raise UserError(
            f"--parallel {parallel} x --procs {procs} needs {parallel * procs} GPUs; {len(gpus)} are visible"
        )
    per = max(1, len(cores) // parallel)  # fewer cores than trials: they share them
    return [
        Slot(
            cores=[cores[(k * per + i) % len(cores)] for i in range(per)],
            gpus=gpus[k * procs : (k + 1) * procs] if gpus else [],
        )
        for k in range(parallel)
    ]


def _in_child(cores: list[int]):
    def setup():
        os.sched_setaffinity(0, cores)
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    return setup


def wait_unlocked(files: TrialFiles, timeout: float = 300) -> None:
    """A run killed with the driver may still be writing its last checkpoint: wait for its lock."""
    path = files.run_dir / LOCK_NAME
    deadline = time.monotonic() + timeout
    while path.exists():
        with open(path, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
        if time.monotonic() > deadline:
            raise UserError(f"trial {files.number}: {files.run_dir} is still in use by another run")
        time.sleep(0.5)


class LocalTrial:
    """One trial's torchrun."""

    def __init__(self, files: TrialFiles, slot: Slot, procs: int, extra_env: dict):
        wait_unlocked(files)
        env = {**os.environ, **extra_env, TRIAL_ENV: str(files.link.resolve())}
        env["OMP_NUM_THREADS"] = str(max(1, len(slot.cores) // procs))
        if slot.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(slot.gpus)
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
            env.pop(k, None)
        cmd = [
            sys.executable,
            "-m",
            "dist_cnn.distributed.torchrun",
            "--standalone",
            "--nnodes=1",
            f"--nproc_per_node={procs}",
            "--module",
            "dist_cnn.cli",
            "train",
            "--config",
            str(files.config.resolve()),
        ]
        self.files, self.slot = files, slot
        with open(files.log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # the terminal's Ctrl-C reaches the driver, which forwards it
                preexec_fn=_in_child(slot.cores),
            )

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self) -> None:
        """SIGTERM: the run checkpoints at its next step and exits; the next driver resumes it."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)

    def wait(self) -> int:
        return self.proc.wait()


class LocalLauncher:
    detached = False  # its trials stop with the driver

    def __init__(self, parallel: int, procs: int, extra_env: dict | None = None):
        self.procs, self.extra_env = procs, extra_env or {}
        self.free = make_slots(parallel, procs)
        self.capacity = parallel

    def launch(self, files: TrialFiles) -> LocalTrial:
        return LocalTrial(files, self.free.pop(0), self.procs, self.extra_env)

    def release(self, trial: LocalTrial) -> None:
        self.free.append(trial.slot)

    def attach(self, files: TrialFiles):
        return None  # local trials never outlive their driver
