"""--launch slurm: each trial an `sbatch slurm/train.sh --config trials/NNNN.toml` job, at most K pending or
running at once. The job id is kept in trials/NNNN.job, so a driver started again finds its trials'
jobs; a job that SLURM preempts and requeues keeps its id, resumes from its checkpoint and reports to
the same trial. The sweep directory must be on a filesystem that the nodes share.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from dist_cnn.errors import UserError, one_line
from dist_cnn.sweep.trialfiles import TRIAL_ENV, TrialFiles

FINISHED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def job_state(job: str) -> str | None:
    """The job's state, or None once SLURM has forgotten it (or it finished)."""
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True)
    state = out.stdout.strip().splitlines()
    if out.returncode != 0 or not state or state[0] in FINISHED:
        return None
    return state[0]


class SlurmTrial:
    def __init__(self, files: TrialFiles, job: str):
        self.files, self.job = files, job

    def poll(self) -> int | None:
        """None while the job is queued, running or requeued; then the job's exit code (0 when SLURM has
        forgotten it: the outcome itself is in the trial's files)."""
        if job_state(self.job) is not None:
            return None
        out = subprocess.run(["scontrol", "show", "job", self.job], capture_output=True, text=True)
        found = re.search(r"\bExitCode=(\d+):(\d+)", out.stdout)
        return int(found.group(1)) if found else 0

    def stop(self) -> None:
        pass  # the jobs outlive the driver: a driver started again finds them

    def wait(self) -> int:
        return 0


class SlurmLauncher:
    detached = True  # its trials outlive the driver

    def __init__(self, parallel: int, sbatch_args: list[str], script: str, extra_env: dict | None = None):
        if not Path(script).is_file():
            raise UserError(f"--slurm-script {script}: no such file (run the sweep from the repository root)")
        self.capacity, self.sbatch_args, self.script = parallel, sbatch_args, script
        self.extra_env = extra_env or {}

    def launch(self, files: TrialFiles) -> SlurmTrial:
        env = {**os.environ, **self.extra_env, TRIAL_ENV: str(files.link.resolve())}
        cmd = [
            "sbatch",
            "--parsable",
            f"--job-name=sweep-{files.number:04d}",
            f"--output={files.log.resolve()}",
            "--open-mode=append",
            *self.sbatch_args,
            self.script,
            "--config",
            str(files.config.resolve()),
        ]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        except OSError as e:
            raise UserError(f"--launch slurm: cannot run sbatch ({one_line(e)})") from None
        if out.returncode != 0:
            raise UserError(f"--launch slurm: sbatch failed: {one_line(out.stderr or out.stdout)}")
        job = out.stdout.strip().split(";")[0]
        files.job.write_text(job + "\n")
        return SlurmTrial(files, job)

    def release(self, trial: SlurmTrial) -> None:
        pass

    def attach(self, files: TrialFiles) -> SlurmTrial | None:
        """The trial's job when it is still queued or running (the driver was restarted)."""
        if not files.job.is_file():
            return None
        job = files.job.read_text().strip()
        return SlurmTrial(files, job) if job_state(job) is not None else None
