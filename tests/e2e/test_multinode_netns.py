"""Multi-node on hosts with their own addresses and names. Every node is a Linux network namespace
(tests/netns/netns.sh): node I has address 10.77.0.I and host name nI, the nodes are joined by a
bridge in a namespace of its own, and no address outside these namespaces is used.

* torchrun, one agent per node, c10d rendezvous on node 1's address (launch/multinode.sh): the same
  weights as one node of two processes; SIGKILL of node 2 ends node 1's job with one clear line; with
  --max-restarts a restarted node 2 rejoins and the job resumes from its checkpoint.
* SLURM with one slurmd per node (tests/netns/slurm2.sh, its own directory, ports and munge socket):
  `sbatch --nodes=2 ... slurm/train.sh` in both launch modes, and SIGUSR1 requeue + resume.

Needs root (network, mount and UTS namespaces): skipped with the reason otherwise, an error under
CI=true. Each test makes its own namespaces (unique names) and deletes them, and whatever still runs
in them, even when it fails.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.slurm import helpers as slurm
from tests.slurm.fixtures import in_ci
from tests.slurm.fixtures import unavailable_reason as slurm_unavailable
from tests.support.common import PY, ROOT, SMALL, clean_env, read_events, read_summary, torchrun, wait_until

pytestmark = pytest.mark.slow

NETNS_SH = ROOT / "tests" / "netns" / "netns.sh"
SLURM2_SH = ROOT / "tests" / "netns" / "slurm2.sh"
MULTINODE_SH = ROOT / "launch" / "multinode.sh"
SLOW_ENTRY = ROOT / "tests" / "support" / "slow_train.py"
SUBNET = os.environ.get("DIST_CNN_NETNS_SUBNET", "10.77.0")
HEAD = f"{SUBNET}.1"


# ---- namespaces -----------------------------------------------------------------------------------


def netns_unavailable() -> str | None:
    missing = [b for b in ("ip", "nsenter", "unshare", "mount", "hostname") if shutil.which(b) is None]
    if missing:
        return f"network namespaces: {', '.join(missing)} not found (iproute2, util-linux)"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN and CAP_SYS_ADMIN); not root"
    return None


def skip_or_fail(reason: str):
    if in_ci():
        pytest.fail(f"CI: {reason}", pytrace=False)
    pytest.skip(reason)


def unique_name(tag: str) -> str:
    """Namespace prefix for this test run: letters and digits only (netns.sh NAME)."""
    return f"dcn{tag}{os.getpid()}{secrets.token_hex(2)}"


class Nodes:
    """Two nodes made by netns.sh; processes started on them with `start` are killed by `down`."""

    def __init__(self, name: str, logs: Path):
        self.name, self.logs, self.procs = name, logs, []

    def cmd(self, i: int, args) -> list[str]:
        return ["bash", str(NETNS_SH), "exec", self.name, str(i), *map(str, args)]

    def start(self, i: int, args, tag: str, env: dict) -> subprocess.Popen:
        log = self.logs / f"n{i}-{tag}.log"
        with open(log, "w") as f:  # a file, not a pipe: a chatty process never blocks on it
            p = subprocess.Popen(self.cmd(i, args), env=env, stdout=f, stderr=subprocess.STDOUT)
        p.log = log
        self.procs.append(p)
        return p

    def run(self, i: int, args, timeout: float = 30) -> str:
        p = subprocess.run(self.cmd(i, args), capture_output=True, text=True, timeout=timeout)
        assert p.returncode == 0, (args, p.stdout, p.stderr)
        return p.stdout

    def kill(self, i: int, sig: str = "KILL") -> list[int]:
        """Signal every process on node i (by PID, from `ip netns pids`); returns those PIDs."""
        pids = subprocess.run(
            ["bash", NETNS_SH, "pids", self.name, str(i)], capture_output=True, text=True, timeout=30
        ).stdout.split()
        subprocess.run(["bash", NETNS_SH, "kill", self.name, str(i), sig], check=True, timeout=30)
        return [int(p) for p in pids]

    def link(self, i: int, state: str) -> None:
        subprocess.run(["bash", NETNS_SH, "link", self.name, str(i), state], check=True, timeout=30)

    def down(self) -> None:
        subprocess.run(["bash", NETNS_SH, "down", self.name], capture_output=True, timeout=60)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:  # started outside the nodes (cannot happen): leave it
                pass


def make_nodes(name: str, logs: Path) -> Nodes:
    reason = netns_unavailable()
    if reason:
        skip_or_fail(reason)
    p = subprocess.run(["bash", NETNS_SH, "up", name, "2"], capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        subprocess.run(["bash", NETNS_SH, "down", name], capture_output=True, timeout=60)
        skip_or_fail(f"cannot make network namespaces here: {p.stderr.strip() or p.stdout.strip()}")
    return Nodes(name, logs)


@pytest.fixture
def nodes(tmp_path):
    n = make_nodes(unique_name("t"), tmp_path)
    try:
        # The setup the tests rely on: node 2 has its own name and address and finds node 1 by name.
        assert n.run(2, ["sh", "-c", "hostname; getent hosts n1"]).split() == ["n2", HEAD, "n1"]
        yield n
    finally:
        n.down()


def log_text(p) -> str:
    return Path(p.log).read_text(errors="replace")


def wait_all(procs, timeout: float) -> list[int]:
    """Exit codes of procs; a hang past `timeout` fails the test (the fixture kills what is left)."""
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"still running after {timeout:.0f} s:\n"
                + "\n".join(f"--- {q.log.name}\n{log_text(q)[-3000:]}" for q in procs),
                pytrace=False,
            )
    return codes


def wait_for_event(run: Path, pattern: str, procs, timeout: float = 180) -> None:
    """Until metrics.jsonl matches `pattern`; fails at once when an agent exits first."""
    metrics = run / "metrics.jsonl"

    def matched():
        if metrics.exists() and re.search(pattern, metrics.read_text(errors="replace")):
            return True
        ended = [p for p in procs if p.poll() is not None]
        if ended:
            pytest.fail(
                f"{ended[0].log.name} exited ({ended[0].returncode}) before {pattern!r}:\n{log_text(ended[0])[-4000:]}",
                pytrace=False,
            )
        return False

    wait_until(matched, timeout, f"{pattern!r} in {metrics}")


# ---- torchrun: one agent per node ---------------------------------------------------------------------


def agent_env(**extra) -> dict:
    # One thread per process: two nodes share this machine's cores.
    return clean_env(DIST_CNN_PYTHON=PY, OMP_NUM_THREADS="1", **extra)


def start_agent(nodes: Nodes, i: int, args, tag: str, restarts: int = 0, **env) -> subprocess.Popen:
    cmd = [
        "bash",
        MULTINODE_SH,
        "--nnodes",
        "2",
        "--node-rank",
        i - 1,
        "--head",
        f"{HEAD}:29500",
        "--procs",
        "1",
        "--run-id",
        "netns",
        "--max-restarts",
        restarts,
        *args,
    ]
    return nodes.start(i, cmd, tag, agent_env(**env))


def weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "model.pt", weights_only=True)["model"]


@pytest.mark.timeout(420)
def test_two_nodes_match_one_node_of_two_processes(nodes, tmp_path):
    args = [*SMALL, "--max-steps", "6", "--eval-every", "0"]
    agents = [start_agent(nodes, i, [*args, "--out", tmp_path / "two_nodes"], "run") for i in (1, 2)]
    assert wait_all(agents, timeout=180) == [0, 0], [log_text(p)[-3000:] for p in agents]
    torchrun(2, [*args, "--out", tmp_path / "one_node"], env=agent_env(), timeout=180, check=0)
    s = read_summary(tmp_path / "two_nodes")
    assert (s["world_size"], s["backend"], s["steps"], s["per_rank_batch_size"]) == (2, "gloo", 6, 32)
    w2, w1 = weights(tmp_path / "two_nodes"), weights(tmp_path / "one_node")
    assert w2.keys() == w1.keys()
    diff = max((w2[k].float() - w1[k].float()).abs().max().item() for k in w1)
    assert diff <= 1e-5, diff


# A run of 2 x 16 steps slowed to ~0.3 s a step (tests/support/slow_train.py), so that it is still
# training when node 2 is killed; a checkpoint every 4 steps.
SLOW_ARGS = [
    *SMALL,
    "--synthetic-train-size",
    "1024",
    "--epochs",
    "2",
    "--log-every",
    "2",
    "--checkpoint-every-steps",
    "4",
    "--checkpoint-every-minutes",
    "0",
]
SLOW_ENV = {"DIST_CNN_ENTRY": str(SLOW_ENTRY), "STEP_SLEEP": "0.3"}
TIMEOUT = 60  # --timeout: every collective gives up after this long


@pytest.mark.timeout(300)
def test_killed_node_ends_the_job_with_one_clear_line(nodes, tmp_path):
    run = tmp_path / "run"
    args = [*SLOW_ARGS, "--timeout", TIMEOUT, "--out", run]
    agents = [start_agent(nodes, i, args, "run", **SLOW_ENV) for i in (1, 2)]
    wait_for_event(run, r'"event": "train"', agents)
    assert nodes.kill(2), "no process on node 2"
    # Node 1 must end by itself within --timeout (no hang), with a clear line from rank 0.
    codes = wait_all(agents, timeout=TIMEOUT)
    text = log_text(agents[0])
    assert codes[0] != 0 and codes[1] == -9, (codes, text[-4000:])
    assert "[rank 0] error: lost contact with another process of the job" in text, text[-4000:]
    assert "[rank0]: Traceback" not in text, text[-4000:]  # one line from the worker, not a traceback
    assert not (run / "summary.json").exists()


@pytest.mark.timeout(300)
def test_cut_off_node_ends_the_job_after_timeout(nodes, tmp_path):
    """Node 2's link goes down while its processes live on: nothing fails fast, node 1 must give up
    after --timeout with the same clear line."""
    run, timeout = tmp_path / "run", 15
    args = [*SLOW_ARGS, "--timeout", timeout, "--out", run]
    agents = [start_agent(nodes, i, args, "run", **SLOW_ENV) for i in (1, 2)]
    wait_for_event(run, r'"event": "train"', agents)
    nodes.link(2, "down")
    codes = wait_all(agents[:1], timeout=timeout + 60)  # --timeout, then torchrun's own shutdown
    text = log_text(agents[0])
    assert codes[0] != 0, text[-4000:]
    assert "[rank 0] error: lost contact with another process of the job" in text, text[-4000:]
    assert not (run / "summary.json").exists()


@pytest.mark.timeout(480)
def test_restarted_node_rejoins_and_the_job_resumes(nodes, tmp_path):
    run = tmp_path / "run"
    args = [*SLOW_ARGS, "--timeout", TIMEOUT, "--out", run]
    node1, node2 = (start_agent(nodes, i, args, "first", restarts=1, **SLOW_ENV) for i in (1, 2))
    wait_for_event(run, r'"event": "checkpoint"', [node1, node2])
    nodes.kill(2)
    assert wait_all([node2], timeout=30) == [-9]
    # A new torchrun agent on node 2, as after a reboot; node 1's agent restarts its worker and waits
    # for it in the next rendezvous round.
    node2 = start_agent(nodes, 2, args, "again", restarts=1, **SLOW_ENV)
    assert wait_all([node1, node2], timeout=240) == [0, 0], [log_text(p)[-3000:] for p in (node1, node2)]
    resumes = read_events(run, "resume")
    assert len(resumes) == 1 and resumes[0]["step"] >= 4, resumes
    # metrics.jsonl names the checkpoint it resumed from until pruning removes that file
    assert resumes[0].get("pruned") or f"step-{resumes[0]['step']:08d}.pt" in resumes[0]["from"], resumes
    s = read_summary(run)
    assert (s["world_size"], s["epochs"], s["steps"]) == (2, 2, 2 * 1024 // 64)
    assert "resumed from" in log_text(node1)


# ---- SLURM: one slurmd per node ------------------------------------------------------------------------

TWO_NODES = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"]
MODES = ["torchrun", "srun"]


class Slurm2:
    """The two-node cluster; `env` puts its client wrappers (run on n1) first on PATH, so the
    helpers of tests/slurm/helpers.py reach it when given env=cluster.env."""

    def __init__(self, d: Path, netns: str):
        self.dir, self.netns = d, netns
        self.script_env = {**os.environ, "DIST_CNN_SLURM2_DIR": str(d), "DIST_CNN_SLURM2_NETNS": netns}
        self.env = {**os.environ, "PATH": f"{d / 'bin'}:{os.environ.get('PATH', '')}"}

    def script(self, cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(SLURM2_SH), cmd], env=self.script_env, capture_output=True, text=True, timeout=timeout
        )

    def job_env(self, mode: str, entry=None, **extra) -> dict:
        env = clean_env(
            DIST_CNN_PYTHON=PY, DIST_CNN_ENTRY=str(entry or ROOT / "train.py"), DIST_CNN_LAUNCH=mode, **extra
        )
        env["PATH"] = self.env["PATH"]  # sbatch through the wrapper (which drops itself from the job's PATH)
        return env


@pytest.fixture(scope="module")
def slurm2(tmp_path_factory):
    reason = netns_unavailable() or slurm_unavailable()
    if reason:
        skip_or_fail(reason)
    cluster = Slurm2(tmp_path_factory.mktemp("slurm2"), unique_name("s"))
    try:
        p = cluster.script("start")
        if p.returncode != 0:
            pytest.fail(f"tests/netns/slurm2.sh start failed ({p.returncode}):\n{p.stdout}\n{p.stderr}", pytrace=False)
        yield cluster
    finally:
        cluster.script("stop")


def out_file(d: Path, job: int) -> str:
    p = d / f"slurm-dist_cnn-{job}.out"
    return p.read_text(errors="replace") if p.exists() else ""


@pytest.fixture(scope="module")
def slurm2_jobs(slurm2, tmp_path_factory):
    """All four jobs submitted at once (they overlap on the nodes): per mode, one plain run and one
    slowed run that gets SIGUSR1 once it trains. {(kind, mode): (job, submit dir, run dir)}."""
    jobs = {}
    for mode in MODES:
        d = tmp_path_factory.mktemp(f"complete-{mode}")
        job = slurm.sbatch([*TWO_NODES, slurm.TRAIN_SH, *SMALL, "--out", d / "run"], cwd=d, env=slurm2.job_env(mode))
        jobs["complete", mode] = job, d, d / "run"
        d = tmp_path_factory.mktemp(f"usr1-{mode}")
        args = [*SLOW_ARGS, "--checkpoint-every-steps", "0", "--out", d / "run"]
        job = slurm.sbatch(
            [*TWO_NODES, slurm.TRAIN_SH, *args], cwd=d, env=slurm2.job_env(mode, SLOW_ENTRY, STEP_SLEEP="0.4")
        )
        jobs["usr1", mode] = job, d, d / "run"
    try:
        signal_when_training([jobs["usr1", mode] for mode in MODES], slurm2.env)
        yield jobs
    finally:
        for job, _, _ in jobs.values():
            if slurm.job_state(job, env=slurm2.env) is not None:
                slurm.scancel(job, env=slurm2.env)


def signal_when_training(jobs, env, timeout: float = 180) -> None:
    """SIGUSR1 to each job's batch shell as soon as it trains (the trainer handles USR1 from before
    its first step on, so a train event means it is armed), whichever job gets there first."""
    pending = list(jobs)

    def all_signalled():
        for job, d, run in list(pending):
            metrics = run / "metrics.jsonl"
            if metrics.exists() and '"event": "train"' in metrics.read_text(errors="replace"):
                slurm.scancel(job, "USR1", batch=True, env=env)  # what --signal=B:USR1@120 does
                pending.remove((job, d, run))
            elif slurm.job_state(job, env=env) is None:
                pytest.fail(f"job {job} ended before training:\n{out_file(d, job)[-4000:]}", pytrace=False)
        return not pending

    wait_until(all_signalled, timeout, "training in every job")


def assert_done(info: dict, text: str) -> None:
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), (info, text[-4000:])
    assert info["NodeList"] == "n[1-2]", info


# The first test's time includes the module fixtures: the cluster's start and all four submissions.
@pytest.mark.slurm
@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode", MODES)
def test_slurm_two_nodes_complete(slurm2, slurm2_jobs, mode):
    job, d, run = slurm2_jobs["complete", mode]
    info = slurm.wait_job(job, timeout=240, env=slurm2.env)
    text = out_file(d, job)
    assert_done(info, text)
    assert f"launch={mode}" in text and "on n[1-2] (2 node(s)" in text, text[-4000:]
    s = read_summary(run)
    assert (s["world_size"], s["backend"], s["steps"]) == (2, "gloo", 2048 // 64)


@pytest.mark.slurm
@pytest.mark.timeout(420)
@pytest.mark.parametrize("mode", MODES)
def test_slurm_two_nodes_usr1_requeues_and_resumes(slurm2, slurm2_jobs, mode):
    job, d, run = slurm2_jobs["usr1", mode]
    info = slurm.wait_job(job, timeout=300, env=slurm2.env)
    text = out_file(d, job)
    assert_done(info, text)
    assert info["Restarts"] == "1", (info, text[-4000:])
    # Not "requeued SLURM job": `scontrol requeue` SIGTERMs the whole job at once, and under load rank 0
    # can be gone before it prints that line. Restarts=1 and the rerun's "restart 1" show the requeue.
    assert "batch shell got SIGUSR1" in text and "restart 1" in text, text[-4000:]
    resumes = read_events(run, "resume")
    assert len(resumes) == 1 and resumes[0]["step"] > 0, resumes
    # metrics.jsonl names the checkpoint it resumed from until pruning removes that file
    assert resumes[0].get("pruned") or f"step-{resumes[0]['step']:08d}.pt" in resumes[0]["from"], (
        resumes
    )  # written at the signal
    s = read_summary(run)
    assert (s["world_size"], s["epochs"], s["steps"]) == (2, 2, 2 * 1024 // 64)
