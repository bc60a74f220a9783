"""Checkpoints assembled from components (checkpoint.assemble/restore, train.state): the layout, and
an exact resume of every component mid-epoch, lookahead and EMA included. In-process."""

from __future__ import annotations

import pytest
import torch

from dist_cnn import config
from dist_cnn.distributed import process_group as D
from dist_cnn.errors import UserError
from dist_cnn.train import checkpoint
from dist_cnn.train.checkpoint import Inline
from dist_cnn.train.state import training_components
from dist_cnn.train.trainer import Trainer

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")


class Counter:
    def __init__(self, step=0):
        self.step = step

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, state):
        self.step = state["step"]


def test_components_nest_by_key_or_inline_and_restore_in_place():
    lin, count = torch.nn.Linear(2, 1), Counter(7)
    state = checkpoint.assemble({"model": lin, "position": Inline(count)})
    assert set(state) == {"model", "step"} and set(state["model"]) == {"weight", "bias"}
    other, back = torch.nn.Linear(2, 1), Counter()
    checkpoint.restore(state, {"model": other, "position": Inline(back)})
    assert back.step == 7 and torch.equal(other.weight, lin.weight)
    with pytest.raises(ValueError, match="both write"):
        checkpoint.assemble({"position": Inline(count), "step": Inline(Counter())})
    with pytest.raises(UserError, match="no 'ema' state"):
        checkpoint.restore(state, {"ema": torch.nn.Linear(2, 1)})


FLAGS = (
    "--model seed --dataset synthetic --synthetic-train-size 64 --synthetic-test-size 16 --batch-size 16 "
    "--epochs 2 --lookahead-every 2 --model-ema --model-ema-steps 1 --precision fp32 --wandb disabled --no-progress"
).split()


def cfg_of(*extra) -> config.Config:
    return config.from_args(config.train_parser().parse_args([*FLAGS, *map(str, extra)]))


def trained(cfg: config.Config, steps: int, save: bool = False) -> dict:
    """The components' state after `steps` optimizer steps of a Trainer (and a checkpoint, if `save`)."""
    with D.process_group(cfg.dist.backend, cfg.dist.timeout, cfg.dist.setup_timeout) as env:
        trainer = Trainer(cfg, env)
        try:
            trainer.run_steps(steps)
            if save:
                trainer.save_checkpoint()
            return checkpoint.assemble(training_components(trainer))
        finally:
            trainer.stop.uninstall()
            trainer.heartbeat.stop()


def test_a_mid_epoch_checkpoint_resumes_every_component_exactly(tmp_path):
    straight = trained(cfg_of("--out", tmp_path / "straight"), 8)
    trained(cfg_of("--out", tmp_path / "cut"), 3, save=True)  # epoch 1, step 3 of 4
    path = tmp_path / "cut" / "checkpoints" / "step-00000003.pt"
    saved = checkpoint.load(path)
    assert (saved["epoch"], saved["epoch_step"], saved["finished"]) == (0, 3, False)
    assert saved["lookahead"] and saved["ema"] and len(saved["rng"]) == 1
    resumed = trained(cfg_of("--resume", path, "--out", tmp_path / "r"), 5)
    assert (resumed["step"], resumed["epoch"], resumed["epoch_step"]) == (8, 2, 0)
    for key in ("model", "ema", "lookahead"):
        for name, tensor in straight[key].items():
            assert torch.equal(tensor, resumed[key][name]), (key, name)
    for i, buf in straight["optimizer"]["state"].items():
        assert torch.equal(buf["momentum_buffer"], resumed["optimizer"]["state"][i]["momentum_buffer"])
    assert straight["schedule"] == resumed["schedule"]
    assert torch.equal(straight["rng"][0]["torch"], resumed["rng"][0]["torch"])
