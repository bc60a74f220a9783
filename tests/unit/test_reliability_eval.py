"""`dist-cnn eval` refuses bad input in one line; the ETA is smoothed."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch

from dist_cnn.commands import main
from dist_cnn.observability.progress import RateAverage

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")


def run(argv):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, [ln for ln in err.getvalue().splitlines() if ln.strip()]


@pytest.mark.parametrize("value,needle", [("0", "must be in [1"), ("-5", "must be in [1"), ("x", "invalid int")])
def test_eval_bad_batch_size(tmp_path, value, needle):
    torch.save(torch.zeros(2), tmp_path / "t.pt")
    code, lines = run(["eval", "--checkpoint", str(tmp_path / "t.pt"), "--batch-size", value])
    assert code == 2 and len(lines) == 1 and needle in lines[0]


def test_eval_of_a_tensor_file_is_one_line(tmp_path):
    torch.save(torch.zeros(2, 3), tmp_path / "t.pt")
    code, lines = run(["eval", "--checkpoint", str(tmp_path / "t.pt")])
    assert code == 2 and len(lines) == 1 and "bare tensor (2, 3)" in lines[0]


def test_eval_on_a_dataset_with_other_class_names_says_so(tmp_path):
    from dist_cnn import config

    cfg = config.Config()
    cfg.data.dataset = "synthetic"
    cfg.data.synthetic_train_size, cfg.data.synthetic_test_size = 64, 32
    from dist_cnn.data.datasets import load_dataset
    from dist_cnn.models.registry import build_model

    data = load_dataset(cfg.data)
    model = build_model("seed", 3, 10, 32)
    torch.save(
        {
            "model": model.state_dict(),
            "model_name": "seed",
            "classes": [f"kind{i}" for i in range(10)],
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
            "config": config.to_dict(cfg),
        },
        tmp_path / "model.pt",
    )
    code, lines = run(["eval", "--checkpoint", str(tmp_path / "model.pt")])
    assert code == 2 and len(lines) == 1 and "trained on classes [kind0" in lines[0] and "pattern0" in lines[0]
    assert data.classes[0] == "pattern0"


def test_one_slow_interval_does_not_make_the_eta_jump():
    rate = RateAverage()
    for _ in range(10):
        rate.update(1000.0)
    slow = rate.update(1000.0 / 500)  # one interval 500x slower (a long checkpoint write)
    assert slow > 0.75 * 1000  # ETA up by at most a third, not 500x
    for _ in range(30):
        rate.update(500.0)
    assert rate.value == pytest.approx(500, rel=0.01)  # a lasting change is followed
