"""DDP on the CPU with gloo through the real torchrun: equivalence, exact evaluation, multi-node, failure."""

import subprocess

import pytest
import torch

from tests.support.common import PY, ROOT, SMALL, clean_env, free_port, read_summary, run_py, torchrun, train


def weights(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)["model"]


# 6 steps of the 32 in an epoch: evaluated once, at the end
SIX_STEPS = [*SMALL, "--max-steps", "6", "--eval-every", "0"]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """SIX_STEPS on one process without a process group, trained once for the module."""
    out = tmp_path_factory.mktemp("plain") / "run"
    train([*SIX_STEPS, "--out", out], check=0)
    return out


@pytest.mark.slow
def test_world_size_2_matches_world_size_1(tmp_path, plain):
    """Global batch 64 on one process vs 32 per rank on two: the same weights after k steps. The ranks
    are new interpreters, each with its own string-hash seed (PYTHONHASHSEED=random makes torchrun's
    agent one, and so its ranks), where the one-process run is forked from the tests' server."""
    torchrun(2, [*SIX_STEPS, "--out", tmp_path / "ws2"], env=clean_env(PYTHONHASHSEED="random"), check=0)
    w1, w2 = weights(plain), weights(tmp_path / "ws2")
    diff = max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert diff <= 1e-5, diff
    s = read_summary(tmp_path / "ws2")
    assert (s["world_size"], s["backend"], s["per_rank_batch_size"], s["global_batch_size"]) == (2, "gloo", 32, 64)


@pytest.mark.slow
def test_exact_eval_world_size_3_on_indivisible_test_set(tmp_path):
    out = tmp_path / "ws3"
    args = [*SMALL, "--synthetic-test-size", "499", "--batch-size", "63", "--max-steps", "5", "--out", out]
    torchrun(3, args, check=0)
    s = read_summary(out)
    assert s["world_size"] == 3 and s["test_total"] == 499  # 499 = 3 * 166 + 1
    p = run_py(
        ["-m", "dist_cnn.cli", "eval", "--checkpoint", out / "model.pt", "--output", tmp_path / "e.json"], check=0
    )
    single = __import__("json").loads((tmp_path / "e.json").read_text())
    assert single["world_size"] == 1 and single["test_total"] == 499
    assert single["test_correct"] == s["test_correct"], (single["test_correct"], s["test_correct"], p.stdout)
    assert single["per_class_accuracy"] == s["per_class_accuracy"]


@pytest.mark.slow
def test_torchrun_2_only_rank_0_writes(tmp_path):
    out = tmp_path / "run"
    p = torchrun(2, [*SMALL, "--epochs", "2", "--out", out, "--log-every", "5"], cwd=tmp_path, check=0)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["run"]  # no stray run dirs, e.g. runs/
    s = read_summary(out)
    assert s["world_size"] == 2 and s["test_total"] == 500 and s["test_accuracy"] > 0.5
    assert p.stdout.count("test accuracy") == 3  # two epochs and the final report, printed once each
    assert "[rank 1]" not in p.stdout + p.stderr


@pytest.mark.slow
def test_two_nodes_on_loopback(tmp_path):
    port = free_port()
    out = tmp_path / "run"
    procs = [
        subprocess.Popen(
            [
                "bash",
                ROOT / "launch/multinode.sh",
                "--nnodes",
                "2",
                "--node-rank",
                str(r),
                "--head",
                f"127.0.0.1:{port}",
                "--procs",
                "1",
                "--run-id",
                "t2n",
                *SMALL,
                "--max-steps",
                "6",
                "--out",
                out,
            ],
            env=clean_env(DIST_CNN_PYTHON=PY),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    logs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    s = read_summary(out)
    assert s["world_size"] == 2 and s["steps"] == 6


def test_a_failing_rank_ends_the_job(tmp_path):
    p = run_py(
        [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            ROOT / "tests/support/fail_rank.py",
            *SMALL,
            "--timeout",
            "30",
            "--out",
            tmp_path / "r",
        ],
        env=clean_env(FAIL_RANK="1", FAIL_STEP="3"),
        timeout=200,
    )
    assert p.returncode != 0
    assert "injected failure on rank 1 at step 3" in p.stdout + p.stderr
    assert not (tmp_path / "r" / "summary.json").exists()


@pytest.mark.slow
def test_accelerate_launch(tmp_path):
    """`--multi_gpu` is accelerate's torchrun path and runs gloo on a CPU-only machine; `--cpu` alone is
    accelerate's single-process launcher (it needs MPI for more), which must train correctly too."""
    common = ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    for flag, world in (("--multi_gpu", 2), ("--cpu", 1)):
        out = tmp_path / flag.strip("-")
        run_py(
            [
                "-m",
                "accelerate.commands.launch",
                flag,
                *common,
                ROOT / "train.py",
                *SMALL,
                "--max-steps",
                "4",
                "--out",
                out,
            ],
            check=0,
            timeout=300,
        )
        assert read_summary(out)["world_size"] == world


@pytest.mark.slow
def test_a_group_of_one_trains_like_no_group(tmp_path, plain):
    """DIST_CNN_GROUP_OF_ONE=1 (the GPU check's NCCL run on one GPU): a single process joins a group of one
    and runs DDP, the step agreement, object collectives and teardown; the weights are a plain run's."""
    group = [*SIX_STEPS, "--out", tmp_path / "group", "--backend", "gloo"]
    train(group, env=clean_env(DIST_CNN_GROUP_OF_ONE="1"), check=0)
    s = read_summary(tmp_path / "group")
    assert (s["world_size"], s["backend"]) == (1, "gloo") and read_summary(plain)["backend"] == "none"
    w1, w2 = weights(plain), weights(tmp_path / "group")
    assert all(torch.equal(w1[k], w2[k]) for k in w1), max((w1[k] - w2[k]).abs().max().item() for k in w1)
    assert s["test_correct"] == read_summary(plain)["test_correct"]
