"""Helpers for tests that run jobs on the local SLURM cluster (tests/slurm/cluster.sh).

    from tests.slurm.helpers import sbatch, wait_job

    def test_x(slurm_cluster, tmp_path):              # fixture: tests/slurm/fixtures.py
        job = sbatch(["--gpus-per-node=0", "--ntasks=2", "--wrap", "srun hostname"], cwd=tmp_path)
        info = wait_job(job, timeout=60)
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0"

No accounting database here, so no sacct: wait_job polls squeue until the job has left
the queue, then reads `scontrol show job -o` (finished jobs stay visible for MinJobAge=300 s).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path

from tests.support.common import wait_until

REPO = Path(__file__).resolve().parents[2]
CLUSTER_SH = REPO / "tests" / "slurm" / "cluster.sh"
TRAIN_SH = REPO / "slurm" / "train.sh"
DEFAULT_DIR = "/tmp/dist_cnn_slurm"

# Job states after which a job does not run again by itself.
TERMINAL_STATES = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
    "SPECIAL_EXIT",
}


class SlurmError(RuntimeError):
    pass


def state_dir() -> Path:
    return Path(os.environ.get("DIST_CNN_SLURM_DIR", DEFAULT_DIR))


def slurm_conf() -> Path:
    return state_dir() / "slurm.conf"


def cluster_env(base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
    """A copy of `base` (default os.environ) with SLURM_CONF pointing at the local cluster, plus extra."""
    env = dict(os.environ if base is None else base)
    env["SLURM_CONF"] = str(slurm_conf())
    env["DIST_CNN_SLURM_DIR"] = str(state_dir())
    env.update(extra)
    return env


def _run(
    cmd: list[str], env: Mapping[str, str] | None = None, cwd=None, timeout: float = 30, check: bool = True
) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, env=cluster_env(env), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise SlurmError(f"{' '.join(map(str, cmd))} failed ({p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p


def sbatch(args: Iterable[str], cwd=None, env: Mapping[str, str] | None = None) -> int:
    """Submit with `sbatch --parsable ARGS` in cwd; returns the job id. Raises SlurmError on rejection.

    env: the job's environment (sbatch exports it to the job); SLURM_CONF is added.
    """
    p = _run(["sbatch", "--parsable", *map(str, args)], env=env, cwd=cwd)
    out = p.stdout.strip()
    m = re.match(r"(\d+)", out) or re.search(r"Submitted batch job (\d+)", out)
    if not m:
        raise SlurmError(f"cannot parse sbatch output: {out!r} {p.stderr!r}")
    return int(m.group(1))


_FIELD = re.compile(r"(?:^|\s)([A-Za-z_][A-Za-z0-9_:/]*)=")


def parse_scontrol(line: str) -> dict[str, str]:
    """'JobId=5 JobName=a b JobState=COMPLETED ...' -> {'JobId': '5', 'JobName': 'a b', ...}."""
    line = line.strip()
    keys = list(_FIELD.finditer(line))
    out = {}
    for i, m in enumerate(keys):
        end = keys[i + 1].start() if i + 1 < len(keys) else len(line)
        out[m.group(1)] = line[m.end() : end].strip()
    return out


def job_info(job_id: int | str, env: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """`scontrol show job -o JOB` as a dict (JobState, ExitCode, Restarts, NodeList, StdOut, ...);
    None once the job is unknown (purged MinJobAge=300 s after it ended)."""
    p = _run(["scontrol", "show", "job", "-o", str(job_id)], env=env, check=False)
    if p.returncode != 0:
        if "Invalid job id" in p.stderr:
            return None
        raise SlurmError(f"scontrol show job {job_id}: {p.stderr.strip()}")
    line = p.stdout.strip().splitlines()[0] if p.stdout.strip() else ""
    return parse_scontrol(line) if line else None


def job_state(job_id: int | str, env: Mapping[str, str] | None = None) -> str | None:
    """The job's state as squeue shows it (PENDING, RUNNING, COMPLETING, ...); None when it has left the queue."""
    p = _run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], env=env, check=False)
    if p.returncode != 0:
        if "Invalid job id" in p.stderr:
            return None
        raise SlurmError(f"squeue -j {job_id}: {p.stderr.strip()}")
    s = p.stdout.strip()
    return s.splitlines()[0] if s else None


def scancel(
    job_id: int | str,
    signal: str | None = None,
    batch: bool = False,
    full: bool = False,
    env: Mapping[str, str] | None = None,
) -> None:
    """scancel [--signal=SIG] [--batch|--full] JOB, e.g. scancel(job, "USR1", batch=True)."""
    cmd = ["scancel"]
    if signal:
        cmd.append(f"--signal={signal}")
    if batch:
        cmd.append("--batch")
    if full:
        cmd.append("--full")
    _run([*cmd, str(job_id)], env=env)


def wait_state(
    job_id: int | str,
    states: Iterable[str] = ("RUNNING",),
    timeout: float = 60,
    poll: float = 0.25,
    env: Mapping[str, str] | None = None,
) -> str:
    """Wait until squeue shows the job in one of `states`; returns that state."""
    states = set(states)

    def reached():
        state = job_state(job_id, env)
        if state in states:
            return state
        if state is None or state in TERMINAL_STATES:
            raise SlurmError(f"job {job_id} ended ({job_info(job_id, env)}) before reaching {sorted(states)}")
        return None

    return wait_until(reached, timeout, f"job {job_id} in {sorted(states)}", interval=poll)


def wait_job(
    job_id: int | str,
    timeout: float = 120,
    poll: float = 0.25,
    cancel_on_timeout: bool = True,
    env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Poll squeue until the job has left the queue (requeues included), then return job_info().

    Useful keys: JobState (COMPLETED, FAILED, CANCELLED, TIMEOUT, ...), ExitCode ('0:0' = exit
    status:signal), Restarts, StdOut, NodeList, RunTime. On timeout the job is cancelled (unless
    cancel_on_timeout=False) and TimeoutError is raised.
    """

    def ended():
        state = job_state(job_id, env)
        if state is None or state in TERMINAL_STATES:
            info = job_info(job_id, env)
            if info is None:
                raise SlurmError(f"job {job_id} left the queue but scontrol does not know it")
            if info.get("JobState") in TERMINAL_STATES:
                return info
        return None

    try:
        return wait_until(ended, timeout, f"end of job {job_id}", interval=poll)
    except TimeoutError:
        info = job_info(job_id, env)
        if cancel_on_timeout:
            _run(["scancel", str(job_id)], env=env, check=False)
        raise TimeoutError(f"job {job_id} still running after {timeout}s: {info}") from None


def wait_for_file_text(
    path,
    pattern: str,
    count: int = 1,
    timeout: float = 60,
    poll: float = 0.25,
    job_id: int | str | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """Wait until `path` contains `pattern` (a regex) at least `count` times; returns the text.
    With job_id, fails early when the job ends first."""
    path = Path(path)
    rx = re.compile(pattern)

    def found():
        text = path.read_text(errors="replace") if path.exists() else ""
        if len(rx.findall(text)) >= count:
            return text
        if job_id is not None and job_state(job_id, env) is None:
            text = path.read_text(errors="replace") if path.exists() else ""
            if len(rx.findall(text)) >= count:
                return text
            raise SlurmError(f"job {job_id} ended before {pattern!r} x{count} appeared in {path}:\n{text[-3000:]}")
        return None

    try:
        return wait_until(found, timeout, f"{pattern!r} x{count} in {path}", interval=poll)
    except TimeoutError:
        text = path.read_text(errors="replace") if path.exists() else ""
        raise TimeoutError(f"{pattern!r} x{count} not in {path} after {timeout}s:\n{text[-3000:]}") from None


def cluster_running() -> bool:
    return subprocess.run(["bash", str(CLUSTER_SH), "status"], capture_output=True).returncode == 0
