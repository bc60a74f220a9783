"""A first step skipped for a non-finite loss: fused SGD (on CUDA and on the CPU) must go on
from zero momentum, exactly as if the step had been skipped on the host before the optimizer saw it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_cnn.config import Config, OptimConfig
from dist_cnn.data.datasets import Dataset
from dist_cnn.distributed.process_group import DistEnv
from dist_cnn.train.optim import build_optimizer, use_fused
from dist_cnn.train.state import OptimizerState
from dist_cnn.train.trainer import Trainer


def _fused_on_cpu() -> bool:
    try:
        torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1, fused=True)
    except RuntimeError:
        return False
    return True


FUSED_ON_CPU = _fused_on_cpu()


class NaNFirst(nn.Module):
    """A small conv net whose first training forward gives a NaN loss (the step's update is skipped)."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int):
        super().__init__()
        self.calls = 0
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        out = self.head(self.body(x).flatten(1))
        if self.training and torch.is_grad_enabled():  # not the output check before training (no_grad)
            self.calls += 1
            if self.calls == 1:
                out = out * float("nan")
        return out


def tiny_data() -> Dataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (96, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 4, (96,), generator=g)
    return Dataset("python", list("abcd"), x, y, x[:16], y[:16])


def trained(tmp_path, name: str, on_device: bool, device=torch.device("cpu")) -> tuple[Trainer, list[torch.Tensor]]:
    cfg = Config()
    cfg.data.dataset = "python"
    cfg.model.name = "test:NaNFirst"
    cfg.train.precision, cfg.train.batch_size, cfg.train.epochs = "bf16", 16, 1
    cfg.optim.weight_decay, cfg.optim.warmup = 5e-4, 0.0
    cfg.log.out, cfg.log.wandb, cfg.log.progress = str(tmp_path / name), "disabled", False
    trainer = Trainer(cfg, DistEnv(device=device), data=tiny_data(), model_factory=NaNFirst)
    trainer.skip_on_device = on_device  # False: the trainer's host path (no optimizer.step at all)
    assert trainer.run_steps(4) == 4
    return trainer, [p.detach().clone() for p in trainer.raw_model.parameters()]


CUDA = pytest.param(
    torch.device("cuda", 0),
    marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
    id="cuda",
)
CPU = pytest.param(
    torch.device("cpu"),
    marks=pytest.mark.skipif(not FUSED_ON_CPU, reason="this torch has no fused SGD kernel for the CPU"),
    id="cpu",
)


@pytest.mark.filterwarnings("error:Detected call of")  # a skipped first step is no misordered schedule
@pytest.mark.parametrize("where", [CPU, CUDA])
def test_a_skipped_first_step_on_the_device_equals_one_skipped_on_the_host(tmp_path, where):
    device = trained(tmp_path, "device", True, where)
    host = trained(tmp_path, "host", False, where)
    assert device[0].optimizer.defaults["fused"] and device[0].skipped_steps == host[0].skipped_steps == 1
    for a, b in zip(device[1], host[1]):
        assert torch.equal(a, b), (a - b).abs().max()
    assert all(torch.isfinite(p).all() for p in device[1])


@pytest.mark.skipif(not FUSED_ON_CPU, reason="this torch has no fused SGD kernel for the CPU")
def test_fused_sgd_momentum_starts_at_zero_even_when_its_first_step_is_skipped():
    """The optimizer the trainer builds, stepped by hand: a skipped step 1 leaves no trace in step 2."""
    torch.manual_seed(0)
    net = nn.Linear(1000, 3)
    ref = nn.Linear(1000, 3)
    ref.load_state_dict(net.state_dict())
    cfg = OptimConfig(lr=0.1, momentum=0.9, nesterov=False)
    cpu = torch.device("cpu")
    opt, opt_ref = build_optimizer(net, cfg, cpu, fused=True), build_optimizer(ref, cfg, cpu, fused=True)
    assert opt.defaults["fused"]
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    opt.found_inf = torch.ones(1)
    opt.step()  # skipped in the kernel
    del opt.found_inf
    for step_opt, model in ((opt, net), (opt_ref, ref)):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        step_opt.found_inf = torch.zeros(1)
        step_opt.step()
        del step_opt.found_inf
    for a, b in zip(net.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_sgd_is_fused_on_the_cpu_and_the_gpu_with_zero_momentum_and_foreachs_math():
    cpu = torch.device("cpu")
    assert use_fused(cpu) and use_fused(torch.device("cuda", 0)) and not use_fused(torch.device("meta"))
    torch.manual_seed(0)
    nets = [nn.Linear(300, 7) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    cfg = OptimConfig(momentum=0.9, nesterov=True, weight_decay=5e-4)
    opts = [build_optimizer(net, cfg, cpu, fused) for net, fused in zip(nets, (False, FUSED_ON_CPU))]
    assert not opts[0].defaults.get("fused") and bool(opts[1].defaults.get("fused")) == FUSED_ON_CPU
    for opt in opts:
        assert all(
            torch.equal(opt.state[p]["momentum_buffer"], torch.zeros_like(p)) for p in opt.param_groups[0]["params"]
        )
    x, init = torch.randn(64, 300), nets[0].weight.detach().clone()
    for _ in range(5):
        for net, opt in zip(nets, opts):
            net(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    assert not torch.equal(nets[0].weight, init)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):  # the same update, up to rounding
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not FUSED_ON_CPU, reason="this torch has no fused SGD kernel for the CPU")
@pytest.mark.parametrize("saved_fused", [False, True], ids=["foreach-checkpoint", "fused-checkpoint"])
def test_a_checkpoints_optimizer_state_keeps_the_implementation_built_here(saved_fused):
    """A checkpoint's param groups name the implementation of the run that wrote it (foreach before
    the CPU went fused, fused from a GPU): loading them must not switch this optimizer's, or the step
    that hands found_inf to a fused kernel would reach foreach, which refuses it."""
    cfg, cpu = OptimConfig(momentum=0.9), torch.device("cpu")
    torch.manual_seed(0)
    writer = nn.Linear(20, 3)
    opt = build_optimizer(writer, cfg, cpu, fused=saved_fused)
    writer(torch.randn(8, 20)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    for here_fused in (False, True):
        net = nn.Linear(20, 3)
        here = build_optimizer(net, cfg, cpu, fused=here_fused)
        OptimizerState(here).load_state_dict(saved)
        assert all(bool(g["fused"]) == here_fused and bool(g["foreach"]) != here_fused for g in here.param_groups)
        for p, q in zip(net.parameters(), writer.parameters()):
            assert torch.equal(here.state[p]["momentum_buffer"], opt.state[q]["momentum_buffer"])
        net(torch.randn(8, 20)).sum().backward()
        if here_fused:
            here.found_inf = torch.zeros(1)
        here.step()
