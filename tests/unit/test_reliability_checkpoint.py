"""Resume never throws good work away: every loadable checkpoint (best.pt too) is considered, pruning
removes unloadable ones first, metrics never name a pruned file, and non-checkpoints are refused in
one line; a changed batch or training set is refused rather than resumed at a wrong position."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from dist_cnn.errors import UserError
from dist_cnn.train import checkpoint as C


def state(step: int, **kw) -> dict:
    s = {
        "model": {"w": torch.full((2,), float(step))},
        "optimizer": {},
        "schedule": {},
        "step": step,
        "epoch": 0,
        "epoch_step": step,
        "config": {"train": {"batch_size": 64}},
        "rng": [],
        "train_size": 2048,
    }
    s.update(kw)
    return s


def corrupt(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_resume_auto_takes_best_pt_when_it_is_the_newest_loadable(tmp_path, logged):
    for step in (10, 20, 30):
        C.write(tmp_path, state(step), keep=5, is_best=step == 30)
    corrupt(tmp_path / "checkpoints" / "step-00000030.pt")
    path, s = C.newest_valid(tmp_path)
    assert path.name == "best.pt" and s["step"] == 30
    assert any("skipping" in m and "step-00000030.pt" in m for m in logged)


def test_resume_auto_takes_the_newer_step_file_over_an_older_best(tmp_path):
    C.write(tmp_path, state(10), keep=5, is_best=True)
    C.write(tmp_path, state(20), keep=5, is_best=False)
    path, s = C.newest_valid(tmp_path)
    assert path.name == "step-00000020.pt" and s["step"] == 20


def test_pruning_removes_unloadable_files_first_and_never_a_loadable_one_while_they_stay(tmp_path):
    for step in (10, 20):
        C.write(tmp_path, state(step), keep=5, is_best=False)
    d = tmp_path / "checkpoints"
    for step in (30, 40):  # written by a crashed predecessor, half on disk
        (d / f"step-{step:08d}.pt").write_bytes(b"PK\x03\x04 truncated")
    C._verified.clear()  # this process did not write the ones above
    new, removed = C.write(tmp_path, state(50), keep=2, is_best=False)
    left = sorted(p.name for p in d.glob("step-*.pt"))
    assert left == ["step-00000020.pt", "step-00000050.pt"]
    assert {p.name for p in removed} == {"step-00000010.pt", "step-00000030.pt", "step-00000040.pt"}


def test_metrics_never_name_a_pruned_checkpoint(tmp_path):
    history = []
    for step in (10, 20, 30):
        path, removed = C.write(tmp_path, state(step), keep=2, is_best=False)
        history.append({"event": "checkpoint", "step": step, "path": str(path)})
        C.scrub_missing(history)
    history.append({"event": "resume", "step": 10, "from": str(tmp_path / "checkpoints" / "step-00000010.pt")})
    assert C.scrub_missing(history)
    for rec in history:
        named = rec.get("path") or rec.get("from")
        assert named is None and rec["pruned"] or os.path.exists(named)
    assert [r.get("pruned", False) for r in history] == [True, False, False, True]


def test_a_model_export_and_a_bare_tensor_are_refused_in_one_line(tmp_path):
    torch.save(
        {"model": {"w": torch.zeros(2)}, "model_name": "seed", "classes": ["a"], "config": {}}, tmp_path / "model.pt"
    )
    torch.save(torch.zeros(3, 4), tmp_path / "t.pt")
    with pytest.raises(UserError, match="model export") as e:
        C.load_training(tmp_path / "model.pt")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"bare tensor \(3, 4\)"):
        C.load_training(tmp_path / "t.pt")
    (tmp_path / "x.pt").write_text("not a checkpoint")
    with pytest.raises(UserError, match="unreadable"):
        C.load_training(tmp_path / "x.pt")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_weights_only_refusal_is_one_plain_line(tmp_path):
    torch.save({"model": {}, "evil": Evil()}, tmp_path / "evil.pt", pickle_module=pickle)
    with pytest.raises(UserError) as e:
        C.load(tmp_path / "evil.pt")
    msg = str(e.value)
    assert "Python objects" in msg and "refused for safety" in msg and "\n" not in msg
    assert "WeightsUnpickler" not in msg and "add_safe_globals" not in msg


def test_a_full_disk_raises_oserror_from_torch_save_and_leaves_no_temporary(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.system(f"mount -t tmpfs -o size=64k tmpfs {mnt} 2>/dev/null") != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with pytest.raises(OSError):
            C.atomic_save({"x": torch.zeros(1 << 20)}, mnt / "big.pt")
        assert list(mnt.iterdir()) == []
    finally:
        os.system(f"umount {mnt}")


@pytest.mark.parametrize(
    "change,needle",
    [
        (dict(batch_size=128), "--batch-size 64"),
        (dict(train_size=1000), "2048 training images"),
        (dict(steps_per_epoch=8), "past the end"),
        (dict(total_steps=10, epochs=1), "past the end"),
    ],
)
def test_resume_with_a_changed_batch_dataset_or_length_is_refused(change, needle):
    s = state(20, epoch=0, epoch_step=20)
    args = dict(batch_size=64, train_size=2048, steps_per_epoch=32, total_steps=64, epochs=2) | change
    with pytest.raises(UserError, match=needle):
        C.check_resumable(s, **args)


def test_resume_at_the_same_batch_and_more_epochs_is_allowed():
    C.check_resumable(
        state(32, epoch=1, epoch_step=0), batch_size=64, train_size=2048, steps_per_epoch=32, total_steps=96, epochs=3
    )
    C.check_resumable(
        state(64, epoch=2, epoch_step=0), batch_size=64, train_size=2048, steps_per_epoch=32, total_steps=64, epochs=2
    )  # at its very end: evaluates and finishes
