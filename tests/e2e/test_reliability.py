"""Reliability end to end: real runs in subprocesses (bad values, run-directory locks, resume rules,
write failures, signals, launch scripts)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from common import ROOT, SMALL, clean_env, train


@pytest.mark.parametrize("args,needle", [
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--timeout", "inf"], "--timeout must be a finite number"),
    (["--log-every", "0"], "--log-every must be positive"),
    (["--synthetic-test-size", "0"], "--synthetic-test-size must be positive"),
    (["--image-size", "-4"], "--image-size must be in [4, 1024]"),
    (["--checkpoint-every-minutes", "nan"], "--checkpoint-every-minutes must be a finite number"),
])
def test_bad_values_in_a_real_process(tmp_path, args, needle):
    p = train([*SMALL, "--out", tmp_path / "run", *args])
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and needle in lines[0], p.stderr
    assert not (tmp_path / "run").exists()


def test_wandb_keeps_its_files_under_the_run_directory(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(HOME=str(home), WANDB_MODE="offline")
    env.pop("XDG_CACHE_HOME", None)
    train([*SMALL, "--max-steps", "2", "--wandb", "offline", "--out", tmp_path / "run"], env=env, check=0)
    assert [p for p in home.rglob("*") if "wandb" in str(p.relative_to(home))] == []
    assert (tmp_path / "run" / "wandb" / ".cache").is_dir()
    # The user's own choice wins.
    mine = tmp_path / "mycache"
    env["WANDB_CACHE_DIR"] = str(mine)
    train([*SMALL, "--max-steps", "2", "--wandb", "offline", "--out", tmp_path / "run2"], env=env, check=0)
    assert mine.is_dir() and not (tmp_path / "run2" / "wandb" / ".cache").exists()


@pytest.mark.parametrize("env,needle", [
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK=2"),
    ({"RANK": "0", "WORLD_SIZE": "2.5"}, "WORLD_SIZE='2.5'"),
    ({"RANK": "1", "WORLD_SIZE": "2"}, "LOCAL_RANK is not set"),
])
def test_contradictory_launch_environment_is_one_line_before_anything_runs(tmp_path, env, needle):
    p = train([*SMALL, "--out", tmp_path / "run"], env=clean_env(**env), timeout=120)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and needle in lines[0], p.stderr
    assert not (tmp_path / "run").exists()


def launch_node(args, tmp_path, **env):
    return subprocess.run(["bash", ROOT / "launch/node.sh", "--procs", "2", *map(str, args)], cwd=tmp_path,
                          env=clean_env(DIST_CNN_PYTHON=sys.executable, OMP_NUM_THREADS="1", **env),
                          capture_output=True, text=True, timeout=300)


def test_node_launch_with_a_bad_flag_is_one_line_before_torchrun_starts(tmp_path):
    p = launch_node([*SMALL, "--lr", "nan", "--out", tmp_path / "run"], tmp_path)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and lines == ["error: --lr must be a finite number, got nan"], p.stderr
    assert not (tmp_path / "run").exists()


def test_node_launch_error_found_by_the_workers_is_their_line_only(tmp_path):
    p = launch_node(["--dataset", "imagefolder", "--data-dir", tmp_path / "none", "--wandb", "disabled",
                     "--out", tmp_path / "run"], tmp_path)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "[rank 0] error: imagefolder" in lines[0], p.stderr
    assert "ChildFailedError" not in p.stderr and "Traceback" not in p.stderr


def test_node_launch_crash_is_reported_in_one_torchrun_line(tmp_path):
    env = clean_env(DIST_CNN_PYTHON=sys.executable, OMP_NUM_THREADS="1", FAIL_RANK="1", FAIL_STEP="2",
                    FAIL_MODE="kill", PYTHONPATH=f"{ROOT}")
    p = subprocess.run([sys.executable, "-m", "dist_cnn.torchrun", "--standalone", "--nproc_per_node=2",
                        ROOT / "tests/helpers/fail_rank.py", *SMALL, "--out", tmp_path / "run"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 128 + 9, p.stderr
    assert "rank 1" in p.stderr and "SIGKILL" in p.stderr and "ChildFailedError" not in p.stderr, p.stderr
