"""dist_cnn.train.optim: the LR schedule's endpoints, parameter groups, the SGD settings and Lookahead."""

import math
import warnings

import pytest
import torch
from torch import nn

from dist_cnn.config import OptimConfig
from dist_cnn.train.optim import Lookahead, advance, build_optimizer, build_schedule, lr_factor, param_groups

CPU = torch.device("cpu")


# ------------------------------------------------------------------------------ lr_factor


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_warmup_starts_small_and_reaches_the_peak(schedule):
    cfg, total = OptimConfig(schedule=schedule, warmup=0.2), 100  # 20 warmup steps
    assert lr_factor(0, total, cfg) == pytest.approx(1 / 20)
    assert [lr_factor(s, total, cfg) for s in range(20)] == pytest.approx([(s + 1) / 20 for s in range(20)])
    assert lr_factor(19, total, cfg) == 1.0 and lr_factor(20, total, cfg) == 1.0  # the peak, then decay


@pytest.mark.parametrize("schedule", ["onecycle", "cosine"])
def test_decays_to_zero_at_the_end(schedule):
    cfg, total = OptimConfig(schedule=schedule, warmup=0.2), 100
    assert lr_factor(total, total, cfg) == pytest.approx(0.0, abs=1e-12)
    after_warmup = [lr_factor(s, total, cfg) for s in range(20, total + 1)]
    assert all(a > b for a, b in zip(after_warmup, after_warmup[1:]))  # strictly decreasing
    assert 0 < lr_factor(total - 1, total, cfg) < 0.05


def test_onecycle_is_linear_and_cosine_is_a_half_cosine():
    total = 100
    one, cos = OptimConfig(schedule="onecycle", warmup=0.2), OptimConfig(schedule="cosine", warmup=0.2)
    assert lr_factor(60, total, one) == pytest.approx(0.5)  # halfway through the 80 decay steps
    assert lr_factor(60, total, cos) == pytest.approx(0.5)
    assert lr_factor(40, total, one) == pytest.approx(0.75)
    assert lr_factor(40, total, cos) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))


def test_no_warmup_starts_at_the_peak():
    cfg = OptimConfig(schedule="onecycle", warmup=0.0)
    assert lr_factor(0, 10, cfg) == 1.0 and lr_factor(5, 10, cfg) == pytest.approx(0.5)
    assert lr_factor(10, 10, cfg) == 0.0


def test_constant_is_constant():
    cfg = OptimConfig(schedule="constant", warmup=0.2)
    assert {lr_factor(s, 50, cfg) for s in range(51)} == {1.0}


def test_schedule_scales_both_parameter_groups():
    cfg = OptimConfig(lr=0.4, bias_lr_scale=8.0, schedule="onecycle", warmup=0.25)
    opt = build_optimizer(small_net(), cfg, CPU)
    sched = build_schedule(opt, 8, cfg)  # 2 warmup steps
    for step in range(8):
        want = lr_factor(step, 8, cfg)
        # weights, BatchNorm parameters (x bias_lr_scale), other biases
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.4 * want, 3.2 * want, 0.4 * want]), step
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0, 0.0]


# ------------------------------------------------------------------------------ parameter groups


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))


def fresh_schedule():
    cfg = OptimConfig(lr=0.1, momentum=0.9, schedule="constant", warmup=0)
    opt = build_optimizer(nn.Linear(4, 2), cfg, CPU)
    return opt, build_schedule(opt, 10, cfg)


def caught(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in seen]


def test_a_skipped_first_step_advances_the_schedule_without_torchs_order_warning():
    _, plain = fresh_schedule()
    assert any("lr_scheduler.step()` before `optimizer.step()" in m for m in caught(plain.step))  # what torch does
    _, schedule = fresh_schedule()
    assert caught(lambda: advance(schedule)) == []
    assert schedule.last_epoch == 1 and set(schedule.get_last_lr()) == {0.1}


def test_advance_leaves_other_warnings_of_the_first_step_alone():
    opt, schedule = fresh_schedule()
    opt.step = lambda *a, **k: None  # replaced after the schedule wrapped it: torch's other first-step warning
    assert any("has been overridden" in m for m in caught(lambda: advance(schedule)))


def test_only_weight_matrices_decay_and_batchnorm_gets_the_bias_lr():
    net = small_net()
    net[4].bias.requires_grad_(False)  # frozen: in no group
    cfg = OptimConfig(lr=0.1, weight_decay=5e-4, bias_lr_scale=64.0)
    weights, norms, biases = param_groups(net, cfg)
    ids = lambda ps: {id(p) for p in ps}
    assert ids(weights["params"]) == ids([net[0].weight, net[4].weight])
    assert ids(norms["params"]) == ids([net[1].weight, net[1].bias])
    assert ids(biases["params"]) == ids([net[0].bias])
    assert (weights["weight_decay"], weights["lr"]) == (5e-4, 0.1)
    assert (norms["weight_decay"], norms["lr"]) == (0.0, pytest.approx(6.4))
    assert (biases["weight_decay"], biases["lr"]) == (0.0, 0.1)


def test_bias_decay_gives_every_group_the_same_decay_per_step():
    cfg = OptimConfig(lr=0.1, weight_decay=5e-4, bias_lr_scale=64.0, bias_decay=True)
    groups = param_groups(small_net(), cfg)
    assert len(groups) == 3
    assert all(g["lr"] * g["weight_decay"] == pytest.approx(0.1 * 5e-4) for g in groups)


def test_optimizer_settings():
    net = small_net()
    opt = build_optimizer(net, OptimConfig(momentum=0.9, nesterov=True), CPU)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))
    # torch refuses nesterov without momentum; the builder drops it instead
    assert not build_optimizer(net, OptimConfig(momentum=0.0, nesterov=True), CPU).defaults["nesterov"]


# ------------------------------------------------------------------------------ Lookahead


def bn_net():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def perturb(net, amount):
    with torch.no_grad():
        for v in net.state_dict().values():
            if v.is_floating_point():
                v.add_(amount)


def floats(net):
    return {k: v.clone() for k, v in net.state_dict().items() if v.is_floating_point()}


def test_lookahead_syncs_every_k_steps_with_the_ramped_decay():
    net = bn_net()
    la = Lookahead(net, every=2, decay=0.5, total_steps=4)
    start = floats(net)
    perturb(net, 1.0)
    la.step(1)  # not a sync step: nothing changes
    assert all(torch.equal(v, start[k] + 1.0) for k, v in floats(net).items())
    la.step(2)
    alpha = 0.5**2 * (2 / 4) ** 3  # decay**every * (step/total)**3
    for k, v in floats(net).items():  # weights (and BatchNorm statistics) := EMA = alpha*old + (1-alpha)*new
        torch.testing.assert_close(v, start[k] * alpha + (start[k] + 1.0) * (1 - alpha))
    assert net[1].num_batches_tracked.dtype == torch.int64  # integer buffers are left alone


def test_lookahead_last_step_copies_the_ema_in():
    net = bn_net()
    la = Lookahead(net, every=2, decay=0.9, total_steps=3)
    la.step(2)
    ema = floats(net)
    perturb(net, 5.0)
    la.step(3)  # the last step, though not a multiple of `every`: the weights become the EMA exactly
    assert all(torch.equal(v, ema[k]) for k, v in floats(net).items())


def test_lookahead_ema_is_a_copy_and_round_trips():
    net = bn_net()
    la = Lookahead(net, every=1, decay=0.8, total_steps=10)
    perturb(net, 1.0)
    assert all(not torch.equal(la.ema[k], v) for k, v in floats(net).items())  # not aliased to the weights
    la.step(5)
    saved = {k: v.clone() for k, v in la.state_dict().items()}
    twin_net = bn_net()
    twin_net.load_state_dict(net.state_dict())
    twin = Lookahead(twin_net, every=1, decay=0.8, total_steps=10)
    twin.load_state_dict(saved)
    for n in (net, twin_net):
        perturb(n, 2.0)
    la.step(6)
    twin.step(6)
    assert all(torch.equal(v, floats(twin_net)[k]) for k, v in floats(net).items())
