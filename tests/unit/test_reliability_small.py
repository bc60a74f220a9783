"""Small but wrong, and still a traceback: each is one clear line or the right value now. In-process."""

from __future__ import annotations

import contextlib
import io
import os
from types import SimpleNamespace

import pytest
import torch

from dist_cnn import config, fit
from dist_cnn.api import materialize
from dist_cnn.commands import main
from dist_cnn.data.datasets import scan_classes
from dist_cnn.distributed.torchrun import root_cause
from dist_cnn.errors import UserError
from dist_cnn.observability.format import console_text, percent
from dist_cnn.observability.report import format_report
from dist_cnn.observability.tensorboard_logger import TensorBoardLogger
from dist_cnn.train.profiling import StepProfiler

from .test_reliability_security import model_file

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")


@pytest.mark.parametrize("label,words", [("cat", "got str 'cat'; map class names"), (2.7, "got float '2.7'")])
def test_api_labels_must_be_integer_indices(label, words):
    items = [(torch.zeros(3, 4, 4, dtype=torch.uint8), label)]
    with pytest.raises(UserError, match="labels must be integer class indices") as e:
        materialize(items, "train")
    assert words in str(e.value)


def test_api_integer_labels_of_every_kind():
    import numpy as np

    items = [(torch.zeros(3, 4, 4, dtype=torch.uint8), v) for v in (1, np.int64(2), torch.tensor(3))]
    assert materialize(items, "train")[1].tolist() == [1, 2, 3]


def test_a_symlink_loop_in_an_image_folder_is_one_line(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "x.jpg").symlink_to("y.jpg")
    (tmp_path / "train" / "a" / "y.jpg").symlink_to("x.jpg")
    with pytest.raises(UserError, match="x.jpg: Too many levels of symbolic links; fix or remove it"):
        scan_classes(str(tmp_path), "train")


def test_an_empty_test_class_is_n_a_not_zero():
    from dist_cnn.train.evaluate import evaluate

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    x, y = torch.zeros(4, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 0, 1, 1])
    env = SimpleNamespace(initialized=False, world_size=1, rank=0, device=torch.device("cpu"), is_rank0=True)
    res = evaluate(model, x, y, num_classes=3, normalize=lambda v: v.float(), env=env, precision="fp32")
    assert res["per_class_accuracy"][2] is None and percent(None).strip() == "n/a"
    text = format_report({"per_class_accuracy": res["per_class_accuracy"], "classes": ["a", "b", "c"]}, [])
    assert "n/a" in text.splitlines()[-1]


def test_class_names_are_escaped_on_the_console():
    assert console_text("cat\x1b[2J\nx") == "cat\\x1b[2J\\nx"
    text = format_report({"per_class_accuracy": [0.5], "classes": ["evil\x1b[31m\nname"]}, [])
    assert "\x1b" not in text and "evil\\x1b[31m\\nname" in text


def test_a_rank_torchrun_killed_is_not_blamed():
    failures = {
        0: SimpleNamespace(exitcode=1, timestamp=100, pid=10),
        1: SimpleNamespace(exitcode=-9, timestamp=131, pid=11),  # SIGKILL at the end of torchrun's grace period
    }
    assert root_cause(failures)[0] == 0
    crashed = {0: SimpleNamespace(exitcode=1, timestamp=100, pid=10), 1: SimpleNamespace(exitcode=-9, timestamp=100)}
    assert root_cause(crashed)[0] == 1  # killed first (out of memory): its peers only lost contact


def test_image_size_is_refused_where_it_is_ignored():
    cfg = config.Config()
    cfg.data.dataset, cfg.data.image_size = "synthetic", 64
    with pytest.raises(UserError, match="--image-size is for --dataset imagefolder"):
        config.validate(cfg)


def test_skip_bad_images_is_refused_by_the_in_memory_loaders(tmp_path):
    with pytest.raises(UserError, match="--skip-bad-images works with --loader stream"):
        fit(
            "seed",
            train="synthetic",
            synthetic_train_size=64,
            synthetic_test_size=32,
            skip_bad_images=True,
            wandb="disabled",
            progress=False,
            out=str(tmp_path / "r"),
        )


def test_an_unwritable_tensorboard_folder_is_one_line(tmp_path, logged):
    (tmp_path / "tensorboard").write_text("a file where the folder goes")
    tb = TensorBoardLogger(tmp_path, True, None)
    assert not tb.active and len(logged) == 1 and "TensorBoard logging disabled" in logged[0]


def test_a_profile_window_past_the_end_says_so(tmp_path, logged):
    prof = StepProfiler("50:60", tmp_path, 0, torch.device("cpu"), False)
    prof.end(20)
    assert len(logged) == 1 and "before the window started; nothing was recorded" in logged[0]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full")
def test_torchscript_export_to_a_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    model = model_file(tmp_path / "model.pt", "seed")
    (tmp_path / "full").symlink_to("/dev/full")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["export", str(model), "--format", "torchscript", "--output", str(tmp_path / "full")])
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    assert code == 1 and len(lines) == 1 and "No space left on device" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "model.pt"]
