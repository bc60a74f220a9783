"""--tensorboard: the event files, read back with TensorBoard's own reader, hold the W&B tags at the
trainer's steps, the confusion matrix as an image, and continue at increasing steps after a resume."""

from __future__ import annotations

import importlib.util

import pytest

from dist_cnn import config as config_mod
from dist_cnn.errors import UserError
from tests.support.common import ROOT, SMALL, clean_env, read_events, run_py, train

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader  # noqa: E402

FAIL = ROOT / "tests/support/fail_rank.py"
# 1024 images / batch 64 = 16 steps an epoch, 2 epochs; train events every 4 steps, checkpoints every 5
ARGS = [
    *SMALL,
    "--synthetic-train-size",
    "1024",
    "--synthetic-test-size",
    "200",
    "--epochs",
    "2",
    "--log-every",
    "4",
    "--checkpoint-every-steps",
    "5",
    "--tensorboard",
]


def _accumulate(run_dir) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


@pytest.mark.slow
def test_tensorboard_tags_and_steps_continue_after_a_resume(tmp_path):
    out = tmp_path / "run"
    p = run_py([FAIL, *ARGS, "--out", out], env=clean_env(FAIL_RANK="0", FAIL_STEP="13"))
    assert p.returncode != 0 and "injected failure" in p.stdout + p.stderr
    # the crashed attempt logged step 12, after its last checkpoint (step 10)
    first = sorted((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(first) == 1
    steps = [
        e.step
        for e in EventFileLoader(str(first[0])).Load()
        if e.summary.value and e.summary.value[0].tag == "train/loss"
    ]
    assert steps == [4, 8, 12]

    train([*ARGS, "--out", out, "--resume", "auto"], check=0)
    files = sorted((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2  # a second event file in the same folder: one stream for TensorBoard
    acc = _accumulate(out)
    tags = acc.Tags()
    train_events, evals = read_events(out, "train"), read_events(out, "eval")
    classes = [f"pattern{i}" for i in range(10)]
    for field in ("loss", "lr", "images_per_sec", "images_per_sec_per_rank", "data_wait_frac", "epoch", "memory_mb"):
        assert f"train/{field}" in tags["scalars"], field
    for part in ("data_wait", "forward_backward", "comm_wait", "optimizer", "step"):  # the rank's time accounting
        assert f"rank/0/{part}_ms" in tags["scalars"], part
    for tag in [
        "test/accuracy",
        "test/correct",
        "test/total",
        "test/epoch",
        "train_seconds",
        *(f"test/per_class_accuracy/{c}" for c in classes),
    ]:
        assert tag in tags["scalars"], tag
    assert tags["images"] == ["test/confusion_matrix"]

    # the resumed stream purges the crashed attempt's step 12 and logs it again: steps strictly increase
    loss = acc.Scalars("train/loss")
    assert [s.step for s in loss] == [r["step"] for r in train_events] == [4, 8, 12, 16, 20, 24, 28, 32]
    assert [s.value for s in loss] == pytest.approx([r["loss"] for r in train_events], rel=1e-6)
    acc_steps = acc.Scalars("test/accuracy")
    assert [s.step for s in acc_steps] == [r["step"] for r in evals] == [16, 32]
    assert [s.value for s in acc_steps] == pytest.approx([r["test_accuracy"] for r in evals])
    per_class = [acc.Scalars(f"test/per_class_accuracy/{c}")[-1].value for c in classes]
    assert per_class == pytest.approx(evals[-1]["per_class_accuracy"])
    images = acc.Images("test/confusion_matrix")
    assert [i.step for i in images] == [16, 32] and images[-1].width > 100 and images[-1].height > 100
    assert images[-1].encoded_image_string.startswith(b"\x89PNG")


def test_tensorboard_without_the_package_is_one_line(monkeypatch):
    """A machine without tensorboard (the optional extra): --tensorboard is refused before any work."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    cfg = config_mod.Config()
    cfg.log.tensorboard = True
    with pytest.raises(UserError, match=r"pip install 'dist_cnn\[tensorboard\]'"):
        config_mod.validate(cfg)
    cfg.log.tensorboard = False
    config_mod.validate(cfg)  # without the flag, the package is not needed
