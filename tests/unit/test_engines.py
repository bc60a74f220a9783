"""The engines' parts that need no engine running: fit()'s setup inside a process group that exists
already (a real one-process gloo group here), and dist_cnn.ray's driver-side checks. The runs
themselves: tests/e2e/test_existing_group.py, tests/e2e/test_ray.py."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist

from dist_cnn.distributed import process_group as D
from dist_cnn.errors import UserError
from dist_cnn.ray import RayReporter, job_config, restarted


def test_an_existing_group_is_used_and_left_in_place(tmp_path):
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp_path / 'store'}",
        rank=0,
        world_size=1,
        timeout=datetime.timedelta(seconds=30),
    )
    try:
        group = dist.group.WORLD
        for _ in range(2):  # twice in a row, as two fit() calls do
            with D.process_group("auto", 30) as env:
                assert (env.launcher, env.backend, env.rank, env.world_size) == ("existing", "gloo", 0, 1)
                assert env.device == torch.device("cpu") and not env.owns_group
            assert dist.is_initialized() and dist.group.WORLD is group
    finally:
        dist.destroy_process_group()


def test_ray_options_are_checked_on_the_driver(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    job = job_config(["--dataset", "synthetic", "--epochs", "2", "--out", "runs/a"])
    assert job["cfg"].log.out == str(tmp_path / "runs" / "a") and job["cfg"].train.epochs == 2
    # no --out: a name fixed now, so that every restart finds the same run directory
    named = job_config(["--dataset", "synthetic"])["cfg"].log.out
    assert os.path.isabs(named) and named.startswith(str(tmp_path / "runs")) and named.endswith("-synthetic")
    with pytest.raises(UserError, match="epochs"):
        job_config(["--epochs", "many"])
    with pytest.raises(UserError, match="unrecognized arguments: --no-such-flag"):
        job_config(["--no-such-flag"])
    fit_style = job_config({"model": "seed", "train": "synthetic", "epochs": 1, "out": "b"})
    assert (fit_style["cfg"].data.dataset, fit_style["factory"], fit_style["datasets"]) == ("synthetic", None, None)
    with pytest.raises(UserError, match="unknown option 'epoch'"):
        job_config({"train": "synthetic", "epoch": 1})
    with pytest.raises(UserError, match="list of train.py flags or a dict"):
        job_config("--epochs 1")


def test_a_ray_restart_recognizes_its_own_run_directory(tmp_path):
    """Killed between writing a checkpoint and Ray taking it, the restarted run resumes from the run
    directory (as torchrun's restart does) only when this same train() call wrote it."""
    token = job_config(["--dataset", "synthetic", "--out", str(tmp_path)])["token"]
    assert not restarted(str(tmp_path), token)
    RayReporter(token).run_dir_ready(tmp_path, is_rank0=False)
    assert not restarted(str(tmp_path), token)
    RayReporter(token).run_dir_ready(tmp_path, is_rank0=True)
    assert restarted(str(tmp_path), token) and not restarted(str(tmp_path), "another call")
