"""--ddp-comm-hook through torchrun with 2 ranks: recorded in config.json and the checkpoints, and a
compressed all_reduce trains to (nearly) the same weights as the plain one."""

import json

import pytest
import torch

from tests.support.common import SMALL, torchrun

ARGS = [*SMALL, "--max-steps", "4", "--eval-every", "0", "--checkpoint-every-steps", "2"]


def weights(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)["model"]


@pytest.mark.slow
def test_bf16_and_powersgd_hooks_are_recorded_and_train(tmp_path):
    torchrun(2, [*ARGS, "--out", tmp_path / "none"], check=0)
    torchrun(2, [*ARGS, "--ddp-comm-hook", "bf16", "--out", tmp_path / "bf16"], check=0)
    torchrun(
        2, [*ARGS, "--ddp-comm-hook", "powersgd", "--powersgd-warmup-steps", "2", "--out", tmp_path / "psgd"], check=0
    )
    plain, bf16 = weights(tmp_path / "none"), weights(tmp_path / "bf16")
    diff = max((plain[k] - bf16[k]).abs().max().item() for k in plain)
    assert 0 < diff < 1e-2, diff  # bf16 on the wire: rounded, not wrong
    for name, hook in (("none", "none"), ("bf16", "bf16"), ("psgd", "powersgd")):
        run = tmp_path / name
        assert json.loads((run / "config.json").read_text())["model"]["ddp_comm_hook"] == hook
        ckpt = torch.load(sorted((run / "checkpoints").glob("step-*.pt"))[-1], weights_only=True)
        assert ckpt["comm_hook"]["name"] == hook and ckpt["config"]["model"]["ddp_comm_hook"] == hook
        assert ("state" in ckpt["comm_hook"]) == (hook == "powersgd")
    psgd = weights(tmp_path / "psgd")
    assert all(torch.isfinite(v).all() for v in psgd.values() if v.is_floating_point())
