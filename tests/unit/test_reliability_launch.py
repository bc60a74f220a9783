"""A launch environment that contradicts itself is one line, before anything starts."""

from __future__ import annotations

import pytest

from dist_cnn.distributed import launch as D
from dist_cnn.errors import UserError

OK = {
    "RANK": "1",
    "WORLD_SIZE": "2",
    "LOCAL_RANK": "1",
    "LOCAL_WORLD_SIZE": "2",
    "MASTER_ADDR": "h",
    "MASTER_PORT": "29500",
}


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"RANK": "2"}, "RANK=2 must be in [0, 1]"),
        ({"RANK": "-1"}, "RANK=-1"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0"),
        ({"WORLD_SIZE": None}, "WORLD_SIZE is not set"),
        ({"RANK": None}, "RANK is not set"),
        ({"LOCAL_RANK": None}, "LOCAL_RANK is not set"),
        ({"LOCAL_RANK": "x"}, "LOCAL_RANK='x'"),
        ({"LOCAL_RANK": "2"}, "LOCAL_RANK=2"),
        ({"LOCAL_WORLD_SIZE": "3"}, "LOCAL_WORLD_SIZE=3"),
        ({"RANK": "0", "LOCAL_RANK": "1"}, "cannot exceed RANK"),
        ({"MASTER_PORT": "70000"}, "MASTER_PORT=70000"),
        ({"MASTER_PORT": "http"}, "MASTER_PORT='http'"),
    ],
)
def test_contradictory_torchrun_environment(change, needle):
    env = {k: v for k, v in {**OK, **change}.items() if v is not None}
    with pytest.raises(UserError, match="launch environment") as e:
        D.detect(env)
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"SLURM_PROCID": "4"}, "SLURM_PROCID=4"),
        ({"SLURM_NTASKS": "many"}, "SLURM_NTASKS='many'"),
        ({"SLURM_LOCALID": "-2"}, "SLURM_LOCALID=-2"),
    ],
)
def test_contradictory_srun_environment(change, needle):
    env = {
        "SLURM_PROCID": "1",
        "SLURM_NTASKS": "2",
        "SLURM_LOCALID": "1",
        "SLURM_STEP_ID": "0",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_JOB_ID": "7",
        **change,
    }
    with pytest.raises(UserError, match=needle.replace("[", r"\[")):
        D.detect(env)


def test_a_consistent_environment_still_works():
    env = D.detect(OK)
    assert (env.rank, env.world_size, env.local_rank, env.master_port) == (1, 2, 1, 29500)
    assert D.detect({"RANK": "0", "WORLD_SIZE": "1"}).world_size == 1  # accelerate's single process


SRUN_4_TASKS = {"SLURM_STEP_TASKS_PER_NODE": "4", "SLURM_NODEID": "0"}


@pytest.mark.parametrize(
    "gpu_env, shared",
    [
        ({}, True),  # SLURM manages no GPUs: all four tasks see the node's one GPU
        ({"SLURM_GPUS_ON_NODE": "1"}, True),  # srun --gpus=1 for four tasks
        ({"SLURM_STEP_GPUS": "0"}, True),
        ({"SLURM_GPUS_ON_NODE": "4"}, False),  # --gpus-per-task=1: each task sees its own GPU as cuda:0
        ({"SLURM_STEP_GPUS": "0,1,2,3"}, False),
        ({"SLURM_JOB_GPUS": "4,5,6,7"}, False),
    ],
)
def test_srun_tasks_sharing_one_visible_gpu_is_one_line(gpu_env, shared):
    env = D.DistEnv(rank=1, world_size=4, local_rank=1, launcher="slurm")
    msg = D.shared_gpu(env, {**SRUN_4_TASKS, **gpu_env})
    assert bool(msg) is shared
    if shared:
        assert "every rank would use cuda:0" in msg and "--gpus-per-task=1" in msg and "\n" not in msg


def test_one_task_per_node_or_torchrun_is_not_checked_here():
    one = {"SLURM_STEP_TASKS_PER_NODE": "1(x2)", "SLURM_NODEID": "1"}
    assert D.shared_gpu(D.DistEnv(rank=1, world_size=2, launcher="slurm"), one) is None
    assert D.shared_gpu(D.DistEnv(rank=1, world_size=4, local_rank=1, launcher="torchrun"), SRUN_4_TASKS) is None
