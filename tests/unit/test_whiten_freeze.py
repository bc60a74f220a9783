"""--freeze-whiten-bias-after: airbench's whitening bias trains for N epochs, then stays where it is.
Without DDP it stops requiring a gradient at the epoch boundary; under DDP its gradient is dropped
after each backward pass. Both give the same weights, bit for bit (the trainer itself, in-process)."""

from __future__ import annotations

import pytest
import torch

from dist_cnn.config import Config
from dist_cnn.data.datasets import Dataset
from dist_cnn.distributed import process_group as D
from dist_cnn.distributed.process_group import DistEnv
from dist_cnn.models.airbench import Airbench
from dist_cnn.train.trainer import Trainer
from dist_cnn.train.whiten_freeze import WhitenBiasFreeze
from tests.support.dist import run_group

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")

STEPS_PER_EPOCH = 2


def narrow_airbench(in_channels, num_classes, image_size):
    return Airbench(in_channels, num_classes, widths=(16, 32, 32))  # airbench's layers, narrower: fast


def airbench_run(env: DistEnv, out: str, per_step_drop: bool = False) -> dict:
    """Three epochs of a narrow airbench at 9 px with the bias frozen after the first: the bias after each
    epoch, and the final weights and momentum buffers."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (24, 3, 9, 9), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 4, (24,), generator=g)
    cfg = Config()
    cfg.data.dataset, cfg.data.loader, cfg.data.flip = "python", "device", True
    cfg.model.freeze_whiten_bias_after = 1
    cfg.optim.momentum, cfg.optim.nesterov, cfg.optim.bias_decay, cfg.optim.clip_grad_norm = 0.85, True, True, 1.0
    cfg.train.precision, cfg.train.batch_size, cfg.train.epochs = "fp32", 12, 3
    cfg.log.out, cfg.log.wandb, cfg.log.progress = out, "disabled", False
    data = Dataset("python", list("abcd"), x, y, x[:8], y[:8])
    trainer = Trainer(cfg, env, data=data, model_factory=narrow_airbench)
    try:
        if per_step_drop:  # the DDP way, at world size 1
            trainer.whiten_freeze = WhitenBiasFreeze(trainer.raw_model, 1, ddp=True)
        bias = [trainer.raw_model.whiten.bias.detach().clone()]
        for _ in range(3):
            trainer.run_steps(STEPS_PER_EPOCH)
            bias.append(trainer.raw_model.whiten.bias.detach().clone())
        opt = trainer.optimizer.state_dict()["state"]
        return {
            "bias": bias,
            "model": trainer.raw_model.state_dict(),
            "momentum": [opt[i]["momentum_buffer"] for i in sorted(opt)],
            "wrapped": type(trainer.model).__name__,
        }
    finally:
        trainer.stop.uninstall()
        trainer.heartbeat.stop()


def check_frozen_after_the_first_epoch(bias: list) -> None:
    assert not torch.equal(bias[0], bias[1])  # trained in epoch 1
    assert torch.equal(bias[1], bias[2]) and torch.equal(bias[1], bias[3])  # then left alone


def test_the_epoch_switch_gives_the_per_step_drops_weights_bit_for_bit(tmp_path):
    runs = []
    for per_step in (False, True):
        with D.process_group("auto", 60) as env:
            runs.append(airbench_run(env, str(tmp_path / f"run{per_step}"), per_step_drop=per_step))
    switched, dropped = runs
    check_frozen_after_the_first_epoch(switched["bias"])
    for name, tensor in dropped["model"].items():
        assert torch.equal(tensor, switched["model"][name]), name
    assert all(torch.equal(a, b) for a, b in zip(dropped["momentum"], switched["momentum"]))


@pytest.mark.slow
def test_the_bias_freezes_under_ddp_without_unused_parameter_errors(tmp_path):
    # spawn: the pytest process may have run autograd already, and autograd does not survive a fork
    ranks = run_group(2, airbench_run, str(tmp_path / "run"), tmp_dir=tmp_path, start_method="spawn")
    for r in ranks:
        assert r["wrapped"] == "DistributedDataParallel"
        check_frozen_after_the_first_epoch(r["bias"])
    for name, tensor in ranks[0]["model"].items():
        if "running" not in name:  # BatchNorm statistics are each rank's own until the next forward
            assert torch.equal(tensor, ranks[1]["model"][name]), name
