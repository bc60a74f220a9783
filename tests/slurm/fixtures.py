"""pytest plugin: the session-scoped `slurm_cluster` fixture (a real one-node SLURM cluster).

Wiring (tests/conftest.py, owned by the lead):   pytest_plugins = ["tests.slurm.fixtures"]
A test module may also import it (`from tests.slurm.fixtures import slurm_cluster`), as
tests/slurm/test_cluster.py does so that it runs without the plugin line; every route shares
one cluster (module-level state below). `tests` must be importable: `python -m pytest` from
the repository root, or pythonpath = ["."] in [tool.pytest.ini_options].

The fixture starts the cluster with tests/slurm/cluster.sh (idempotent: an already running
cluster is reused and then left running) and stops it at the end of the session if it started
it; DIST_CNN_SLURM_KEEP=1 keeps it running. While it is active, os.environ["SLURM_CONF"] points
at the cluster, so plain subprocess calls to sbatch/squeue/scontrol reach it.

SLURM missing (not installed, or not root): the tests are skipped with the reason when CI is
unset; under CI (CI=true/1) it is a failure -- CI must run tests/slurm/install.sh first.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.slurm import helpers
from tests.slurm.helpers import CLUSTER_SH

REQUIRED = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "sinfo", "scancel")


@dataclass
class SlurmCluster:
    dir: Path
    conf: Path
    started_here: bool
    start_output: str = ""
    env: dict = field(default_factory=dict)

    # Conveniences delegating to tests.slurm.helpers with this cluster's environment.
    def sbatch(self, args, cwd=None, env=None) -> int:
        return helpers.sbatch(args, cwd=cwd, env=env)

    def wait_job(self, job_id, timeout: float = 120, **kw) -> dict:
        return helpers.wait_job(job_id, timeout=timeout, **kw)

    def job_info(self, job_id):
        return helpers.job_info(job_id)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable_reason() -> str | None:
    missing = [b for b in REQUIRED if shutil.which(b) is None]
    if missing:
        return f"SLURM not installed (missing {', '.join(missing)}); run tests/slurm/install.sh"
    if os.geteuid() != 0:
        return "the local SLURM cluster runs as root (SlurmUser=root); not root"
    return None


_lock = threading.Lock()
_state: dict = {"users": 0, "cluster": None, "saved_env": None}


def _acquire() -> SlurmCluster:
    with _lock:
        if _state["cluster"] is not None:
            _state["users"] += 1
            return _state["cluster"]
        reason = unavailable_reason()
        if reason:
            if in_ci():
                pytest.fail(f"CI: {reason}", pytrace=False)
            pytest.skip(reason)
        p = subprocess.run(["bash", str(CLUSTER_SH), "start"], capture_output=True, text=True, timeout=180)
        if p.returncode != 0:
            pytest.fail(f"tests/slurm/cluster.sh start failed ({p.returncode}):\n{p.stdout}\n{p.stderr}", pytrace=False)
        started = p.stdout.strip().startswith("started")
        saved = {k: os.environ.get(k) for k in ("SLURM_CONF", "DIST_CNN_SLURM_DIR")}
        env = helpers.cluster_env()
        os.environ["SLURM_CONF"] = env["SLURM_CONF"]
        os.environ["DIST_CNN_SLURM_DIR"] = env["DIST_CNN_SLURM_DIR"]
        cluster = SlurmCluster(
            dir=helpers.state_dir(),
            conf=helpers.slurm_conf(),
            started_here=started,
            start_output=p.stdout.strip(),
            env=helpers.cluster_env(),
        )
        _state.update(users=1, cluster=cluster, saved_env=saved)
        return cluster


def _release() -> None:
    with _lock:
        _state["users"] -= 1
        if _state["users"] > 0:
            return
        cluster, saved = _state["cluster"], _state["saved_env"]
        _state.update(users=0, cluster=None, saved_env=None)
    try:
        if cluster.started_here and os.environ.get("DIST_CNN_SLURM_KEEP", "") in ("", "0"):
            subprocess.run(["bash", str(CLUSTER_SH), "stop"], capture_output=True, text=True, timeout=120)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node SLURM cluster (partition debug, 16 CPUs advertised, no GPUs)."""
    cluster = _acquire()
    try:
        yield cluster
    finally:
        _release()
