"""The run directory: one live run per directory (an OS lock), no foreign directory overwritten,
killed writes' temporaries cleaned, a fresh start never appends to old metrics."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from dist_cnn import config
from dist_cnn.distributed.process_group import DistEnv
from dist_cnn.errors import UserError
from dist_cnn.train import rundir
from tests.support.common import ROOT, clean_env


def cfg_for(out: Path, **ckpt) -> config.Config:
    cfg = config.Config()
    cfg.log.out = str(out)
    for k, v in ckpt.items():
        setattr(cfg.ckpt, k, v)
    return cfg


@pytest.fixture(autouse=True)
def _release_locks():
    yield
    for key in list(rundir._locks):
        rundir.unlock_run_dir(Path(key))


def hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process that takes the run directory's lock and keeps it."""
    code = (
        "import sys, time; from pathlib import Path; from dist_cnn.train import rundir; "
        "rundir.lock_run_dir(Path(sys.argv[1])); rundir.claim_run_dir(Path(sys.argv[1])); "
        "print('locked', flush=True); time.sleep(120)"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code, str(run_dir)], env=clean_env(), cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_run_fails_at_once_naming_the_holder_and_a_dead_holder_blocks_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = hold_lock(run)
    try:
        with pytest.raises(UserError) as e:
            rundir.prepare_run_dir(cfg_for(run))
        msg = str(e.value)
        assert "in use by another run" in msg and f"pid {holder.pid}" in msg and socket.gethostname() in msg
        assert "\n" not in msg
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert rundir.prepare_run_dir(cfg_for(run)) == run  # the kernel released the dead one's lock


def test_a_forked_child_that_outlives_the_run_does_not_keep_its_lock(tmp_path):
    """A run's DataLoader worker outlives a crashed rank for seconds: its resume must not find the
    directory in use. The run here forks a child that stays, then dies."""
    run = tmp_path / "run"
    run.mkdir()
    code = (
        "import os, sys, time; from pathlib import Path; from dist_cnn.train import rundir; "
        "rundir.lock_run_dir(Path(sys.argv[1])); rundir.claim_run_dir(Path(sys.argv[1])); "
        "pid = os.fork()\n"
        "if pid == 0: os.close(1), os.close(2), time.sleep(120)\n"
        "print(pid, flush=True); os._exit(1)"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, str(run)], env=clean_env(), cwd=ROOT, capture_output=True, text=True
    )
    child = int(p.stdout)
    try:
        assert os.path.exists(f"/proc/{child}")
        assert rundir.prepare_run_dir(cfg_for(run)) == run  # the dead run's lock went with it
    finally:
        os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize("names", [["config.json"], ["model.pt", "notes.txt"], ["loss.png"], ["src"]])
def test_a_foreign_non_empty_directory_is_refused_untouched(tmp_path, names):
    for n in names:
        (tmp_path / n).mkdir() if n == "src" else (tmp_path / n).write_text("mine")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(UserError, match="not a dist_cnn run directory"):
        rundir.prepare_run_dir(cfg_for(tmp_path))
    assert sorted(os.listdir(tmp_path)) == before


def test_empty_new_and_older_run_directories_are_accepted(tmp_path):
    (tmp_path / "empty").mkdir()
    rundir.prepare_run_dir(cfg_for(tmp_path / "empty"))
    rundir.prepare_run_dir(cfg_for(tmp_path / "new" / "deep"))
    old = tmp_path / "old"  # a run directory written before the lock file existed
    old.mkdir()
    (old / "config.json").write_text("{}")
    (old / "metrics.jsonl").write_text("")
    rundir.prepare_run_dir(cfg_for(old))
    assert (old / rundir.LOCK_NAME).is_file()


def test_a_read_only_out_is_refused_before_any_data_is_loaded(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=False)
    if os.access(ro, os.W_OK) and not _is_ro_mount(ro):
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        with pytest.raises(UserError, match="cannot write there"):
            rundir.prepare_run_dir(cfg_for(ro))
    finally:
        subprocess.run(["umount", str(ro)], check=False)


def _is_ro_mount(path: Path) -> bool:
    return bool(os.statvfs(path).f_flag & os.ST_RDONLY)


def test_a_missing_resume_path_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(UserError, match="no such checkpoint file"):
        rundir.prepare_run_dir(cfg_for(tmp_path / "run", resume=str(tmp_path / "nope.pt")))
    assert not (tmp_path / "run").exists()


def test_stale_temporaries_of_killed_writes_are_removed_at_start(tmp_path, logged):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text("")
    stale = [
        run / "checkpoints" / ".step-00000008.pt.tmp4242",
        run / "checkpoints" / ".best.pt.tmp17",
        run / "summary.json.tmp",
        run / ".model.pt.tmp99",
        run / "metrics.jsonl.tmp",
    ]
    for p in stale:
        p.write_bytes(b"x" * 1000)
    keep = run / "checkpoints" / "notes.txt"
    keep.write_text("kept")
    rundir.prepare_run_dir(cfg_for(run, resume="auto"))
    assert not any(p.exists() for p in stale) and keep.exists()
    assert len(logged) == len(stale)


def test_a_fresh_start_does_not_append_to_a_killed_runs_metrics(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"event": "train", "step": 50, "time": 1}\n')
    cfg = cfg_for(run)
    rundir.prepare_run_dir(cfg)  # no checkpoint: allowed without --resume
    assert rundir.resolve_resume(cfg, DistEnv(), run) == (None, None)
    assert not (run / "metrics.jsonl").exists()


def test_lock_is_reentrant_within_one_process(tmp_path):
    rundir.lock_run_dir(tmp_path)
    rundir.lock_run_dir(tmp_path)
    rundir.claim_run_dir(tmp_path)
    content = (tmp_path / rundir.LOCK_NAME).read_text()
    assert content == f"host {socket.gethostname()} pid {os.getpid()}\n"


def test_a_refused_run_leaves_the_lock_file_as_it_was(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.LOCK_NAME).write_text("host other pid 1\n")
    (run / "summary.json").write_text("{}")
    with pytest.raises(UserError, match="finished run"):
        rundir.prepare_run_dir(cfg_for(run))
    assert (run / rundir.LOCK_NAME).read_text() == "host other pid 1\n"


def test_resume_auto_says_which_checkpoint_it_took(tmp_path, logged):
    import torch

    from dist_cnn.train import checkpoint

    run = tmp_path / "run"
    state = {
        "model": {},
        "optimizer": {},
        "schedule": {},
        "step": 7,
        "epoch": 0,
        "epoch_step": 7,
        "config": {},
        "rng": [],
    }
    checkpoint.write(run, state, keep=3, is_best=True)
    torch.save({"x": 1}, run / "checkpoints" / "step-00000009.pt")
    (run / "config.json").write_text("{}")
    (run / "metrics.jsonl").write_text("")
    cfg = cfg_for(run, resume="auto")
    rundir.prepare_run_dir(cfg)
    path, _ = rundir.resolve_resume(cfg, DistEnv(), run)
    assert path.name == "step-00000007.pt"
    assert any("taking" in m and "step-00000007.pt" in m and "(step 7)" in m for m in logged), logged
