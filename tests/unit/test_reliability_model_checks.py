"""A model's output and parameters are checked once, before training, in one line each. In-process,
through the Python API (the CLI builds the same Trainer)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_cnn import fit
from dist_cnn.errors import UserError
from dist_cnn.models.checks import check_output, check_trainable

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")


class Net(nn.Module):
    def __init__(self, logits=10, wrap=None, bn=False, frozen=False):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4) if bn else nn.Identity(), nn.Flatten())
        self.head = nn.Linear(4 * 30 * 30, logits)
        self.wrap = wrap
        if frozen:
            self.requires_grad_(False)

    def forward(self, x):
        out = self.head(self.body(x))
        if self.wrap == "tuple":
            return out, out.mean()
        if self.wrap == "dict":
            return {"aux": out.mean(), "logits": out}
        return out


class NoParameters(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :10]


def run_fit(model, tmp_path, **kw):
    options = dict(
        synthetic_train_size=64,
        synthetic_test_size=32,
        batch_size=8,
        epochs=1,
        max_steps=2,
        wandb="disabled",
        progress=False,
        precision="fp32",
        out=str(tmp_path / "run"),
    )
    return fit(model, train="synthetic", **{**options, **kw})


@pytest.mark.parametrize(
    "model,words",
    [
        (Net(13), "shape [2, 13] for 2 images of 10 classes; it must return logits of shape [batch, classes]"),
        (Net(7), "shape [2, 7]"),
        (Net(wrap="tuple"), "returns a tuple of 2, not a tensor of logits [2, 10]; say which element"),
        (Net(wrap="dict"), "returns a dict with keys 'aux', 'logits'"),
        (Net(frozen=True), "no trainable parameters"),
        (NoParameters(), "no trainable parameters"),
    ],
)
def test_a_wrong_model_is_one_line_before_training(tmp_path, model, words):
    with pytest.raises(UserError, match=None) as e:
        run_fit(model, tmp_path)
    assert words in str(e.value) and "\n" not in str(e.value)
    assert not list((tmp_path / "run").glob("checkpoints/*.pt"))


@pytest.mark.parametrize("wrap,key", [("tuple", "0"), ("dict", "logits")])
def test_output_key_picks_the_logits(tmp_path, wrap, key):
    summary = run_fit(Net(wrap=wrap), tmp_path, output_key=key)
    assert summary["steps"] == 2


def test_a_bad_output_key_is_one_line(tmp_path):
    with pytest.raises(UserError, match="--output-key 5: the model returns a tuple of 2"):
        run_fit(Net(wrap="tuple"), tmp_path, output_key="5")


def test_batchnorm_with_one_image_per_rank(tmp_path):
    with pytest.raises(UserError, match="BatchNorm needs at least 2"):
        run_fit(Net(bn=True), tmp_path, batch_size=2, grad_accum=2)


def test_the_check_changes_neither_statistics_nor_rng():
    layers = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 30 * 30, 3)
    model = nn.Sequential(*layers)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    rng = torch.get_rng_state()
    check_output(model, x, 3)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    check_trainable(model, 2, sync_bn=False)
