"""Preflight checks and `dist-cnn doctor` / `train.py --dry-run` (dist_cnn/distributed/launch.py,
dist_cnn/commands/doctor.py), with fake launcher environments; the same inside real SLURM jobs:
tests/slurm/test_train_slurm.py."""

import json
import socket

import pytest

from dist_cnn.distributed import launch
from tests.support.common import SMALL, clean_env, run_py, train

SRUN_RANK1 = {
    "SLURM_JOB_ID": "77",
    "SLURM_JOB_NAME": "t",
    "SLURM_JOB_NODELIST": "localhost",
    "SLURM_JOB_NUM_NODES": "1",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "2",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_TASKS_PER_NODE": "2",
    "SLURM_TASKS_PER_NODE": "2",
    "SLURM_NODEID": "0",
    "SLURM_CPUS_ON_NODE": "2",
    "SLURM_RESTART_COUNT": "1",
}


def listening_socket():
    s = socket.socket()
    s.bind(("0.0.0.0", 0))
    s.listen()
    return s


@pytest.mark.parametrize("spec,counts", [("2", [2]), ("4(x2),1", [4, 4, 1]), ("", []), ("2(x", [])])
def test_expand_counts(spec, counts):
    assert launch.expand_counts(spec) == counts


def test_tasks_on_node_uses_this_nodes_entry():
    assert launch.slurm_tasks_on_node({"SLURM_STEP_TASKS_PER_NODE": "4(x2),1", "SLURM_NODEID": "2"}) == 1
    assert launch.slurm_tasks_on_node({"SLURM_TASKS_PER_NODE": "3"}) == 3
    assert launch.slurm_tasks_on_node({}) is None


def torchrun_env(local_world, **extra):
    return {
        "RANK": "0",
        "WORLD_SIZE": str(local_world),
        "LOCAL_RANK": "0",
        "LOCAL_WORLD_SIZE": str(local_world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29500",
        **extra,
    }


def test_torchrun_mismatches():
    ok = torchrun_env(2, SLURM_JOB_ID="5", SLURM_STEP_ID="0", SLURM_STEP_TASKS_PER_NODE="1", SLURM_CPUS_ON_NODE="2")
    assert launch.problems(launch.detect(ok), ok) == []
    over = {**ok, "LOCAL_WORLD_SIZE": "3", "WORLD_SIZE": "3"}
    (p,) = launch.problems(launch.detect(over), over)
    assert "3 processes on this node" in p and "2 CPU(s)" in p and "DIST_CNN_NPROC_PER_NODE" in p
    two_agents = {**ok, "SLURM_STEP_TASKS_PER_NODE": "2"}  # `srun --ntasks-per-node=2 torchrun ...`
    (p,) = launch.problems(launch.detect(two_agents), two_agents)
    assert "srun started 2 tasks on this node and each runs torchrun" in p and "--ntasks-per-node=1" in p
    assert launch.problems(launch.detect(torchrun_env(4)), torchrun_env(4)) == []  # no SLURM: nothing to compare


def test_port_check_rank0_only():
    with listening_socket() as s:
        port = s.getsockname()[1]
        rank0 = {**SRUN_RANK1, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "MASTER_PORT": str(port)}
        (p,) = launch.problems(launch.detect(rank0), rank0)
        assert f"MASTER_PORT {port} (from the environment) is already in use" in p
        rank1 = {**SRUN_RANK1, "MASTER_PORT": str(port)}
        assert launch.problems(launch.detect(rank1), rank1) == []
    assert launch.problems(launch.detect(rank0), rank0) == []  # closed: free again
    assert not launch.port_in_use(port)


def test_dry_run_reports_srun_rank_without_training(tmp_path):
    p = train(["--dry-run", "--json", *SMALL], cwd=tmp_path, env=clean_env(**SRUN_RANK1), check=0)
    info = json.loads(p.stdout)
    assert (info["launcher"], info["rank"], info["world_size"], info["local_rank"]) == ("slurm", 1, 2, 1)
    assert (info["device"], info["backend"], info["problems"]) == ("cpu", "gloo", [])
    localhost = {a[4][0] for a in socket.getaddrinfo("localhost", None)}
    head = info["head"]
    assert (sorted(head), head["address"], head["port"]) == (["address", "port", "resolves_to"], "localhost", 20077)
    assert head["resolves_to"] in localhost, (head, localhost)  # where localhost resolves here, not None
    assert info["slurm"]["job_id"] == "77" and info["slurm"]["restart_count"] == 1
    assert info["run_dir"] == "runs/job77-seed-synthetic" and info["resume"] == "auto"  # a requeued job
    assert list(tmp_path.iterdir()) == []  # nothing created, nothing trained


def test_doctor_text_and_batch_shell_problem(tmp_path):
    batch = {k: v for k, v in SRUN_RANK1.items() if k not in ("SLURM_STEP_ID", "SLURM_STEP_TASKS_PER_NODE")}
    env = clean_env(**{**batch, "SLURM_PROCID": "0"})  # `sbatch --ntasks=2 --wrap "python train.py"`
    p = run_py(["-m", "dist_cnn.cli", "doctor"], cwd=tmp_path, env=env)
    assert p.returncode == 2, p.stderr
    assert "batch shell (no srun step)" in p.stdout and "restart count 1" in p.stdout
    assert p.stderr.strip().splitlines()[-1].startswith("[rank 0] error: SLURM_NTASKS > 1 but this is the batch shell")
    assert "srun" in p.stderr and "Traceback" not in p.stderr


def test_training_refuses_a_busy_master_port(tmp_path):
    with listening_socket() as s:
        port = s.getsockname()[1]
        env = clean_env(**{**SRUN_RANK1, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "MASTER_PORT": str(port)})
        p = train([*SMALL, "--out", tmp_path / "run"], env=env, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    (line,) = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert line.startswith("[rank 0] error: MASTER_PORT") and str(port) in line and "MASTER_PORT=" in line
    assert not (tmp_path / "run").exists()


def test_dry_run_in_help():
    from dist_cnn.config import train_parser

    text = train_parser().format_help()
    assert "--dry-run" in text and "dist-cnn doctor" in text
