"""dist_cnn.train.checkpoint: atomic writes, pruning to the newest K, resuming from the newest valid file."""

import pickle
import random

import numpy as np
import pytest
import torch

from dist_cnn.errors import UserError
from dist_cnn.train import checkpoint


def state(step):
    return {
        "step": step,
        "model": {"w": torch.full((3, 2), float(step))},
        "rng": [{"python": [1, 2]}],
        "optimizer": {},
        "schedule": {},
        "epoch": 0,
        "epoch_step": step,
        "config": {},
    }  # a training checkpoint


def names(run_dir):
    return [p.name for p in checkpoint.list_checkpoints(run_dir)]


def test_save_writes_step_files_and_prunes_to_the_newest_k(tmp_path):
    for step in (5, 10, 15, 20, 100):
        path = checkpoint.save(tmp_path, state(step), keep=2, is_best=step == 10)
        assert path == tmp_path / "checkpoints" / f"step-{step:08d}.pt"
    assert names(tmp_path) == ["step-00000020.pt", "step-00000100.pt"]
    assert torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)["step"] == 10  # best survives
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "best.pt",
        "step-00000020.pt",
        "step-00000100.pt",
    ]  # no temporary files left behind
    back = checkpoint.load(tmp_path / "checkpoints" / "step-00000100.pt")
    assert back["step"] == 100 and torch.equal(back["model"]["w"], state(100)["model"]["w"])


def test_list_orders_by_step_number_and_ignores_other_names(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    for name in ("step-9.pt", "step-10.pt", "step-00000002.pt", "step-x.pt", "notes.pt", "best.pt"):
        (d / name).write_bytes(b"")
    assert names(tmp_path) == ["step-00000002.pt", "step-9.pt", "step-10.pt"]
    assert checkpoint.list_checkpoints(tmp_path / "missing") == []


def test_newest_valid_skips_a_truncated_file(tmp_path, logged):
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, state(step), keep=5, is_best=False)
    newest = tmp_path / "checkpoints" / "step-00000003.pt"
    newest.write_bytes(newest.read_bytes()[:200])  # a write cut short (what atomic_save prevents)
    path, loaded = checkpoint.newest_valid(tmp_path)
    assert path.name == "step-00000002.pt" and loaded["step"] == 2
    assert len(logged) == 1 and "step-00000003.pt" in logged[0] and logged[0].startswith("warning: skipping")
    assert "\n" not in logged[0]


def test_newest_valid_with_nothing_loadable(tmp_path, logged):
    assert checkpoint.newest_valid(tmp_path) is None  # no checkpoints directory
    checkpoint.save(tmp_path, state(1), keep=1, is_best=False)
    (tmp_path / "checkpoints" / "step-00000001.pt").write_bytes(b"not a checkpoint")
    assert checkpoint.newest_valid(tmp_path) is None and len(logged) == 1


class Payload:  # anything that needs unpickling of code
    pass


def test_load_refuses_pickled_objects_and_reports_missing_files(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"step": 1, "x": Payload()}, evil)
    with pytest.raises(UserError, match="weights_only=True"):
        checkpoint.load(evil)
    with pytest.raises(UserError, match="not found"):
        checkpoint.load(tmp_path / "nope.pt")


def test_failed_write_keeps_the_previous_file(tmp_path):
    checkpoint.save(tmp_path, state(7), keep=3, is_best=False)
    path = tmp_path / "checkpoints" / "step-00000007.pt"
    before = path.read_bytes()
    with pytest.raises((pickle.PicklingError, AttributeError)):  # a local lambda does not pickle
        checkpoint.atomic_save({"step": 7, "bad": lambda: None}, path)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # the temporary file was removed


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want
