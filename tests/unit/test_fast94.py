"""The fast recipe (configs/fast94.toml) component by component against airbench94 as published
(the `airbench` 0.1.8 package: lib_airbench94.py and utils.py). CPU only, a few seconds."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dist_cnn import config as C
from dist_cnn.data.loader import normalization_stats
from dist_cnn.data.stats import init_sample
from dist_cnn.models.registry import build_model
from dist_cnn.train.optim import build_optimizer, build_schedule, lr_factor, param_groups, total_steps

ROOT = Path(__file__).resolve().parents[2]


def fast94() -> C.Config:
    cfg = C.Config()
    C.apply_dict(cfg, C.load_file(str(ROOT / "configs" / "fast94.toml")))
    C.validate(cfg)
    return cfg


def airbench_triangle(steps, start, end, peak):
    """airbench's utils.train.triangle, verbatim but for the name."""
    xp = torch.tensor([0, int(peak * steps), steps])
    fp = torch.tensor([start, 1, end])
    x = torch.arange(1 + steps)
    m = (fp[1:] - fp[:-1]) / (xp[1:] - xp[:-1])
    b = fp[:-1] - (m * xp[:-1])
    indices = torch.sum(torch.ge(x[:, None], xp[None, :]), 1) - 1
    indices = torch.clamp(indices, 0, len(m) - 1)
    return m[indices] * x + b[indices]


def class_sorted_images(per_class=200, classes=10, size=8):
    """An image folder's order: class 0's images first, each class with its own brightness."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat(
        [(torch.rand(per_class, 3, size, size, generator=g) * 60 + 20 * k).to(torch.uint8) for k in range(classes)]
    )
    return x, torch.arange(classes).repeat_interleave(per_class)


def test_epochs_9_9_is_airbench_step_count():
    cfg = fast94()
    assert cfg.train.epochs == 9.9
    # airbench: total_train_steps = ceil(len(train_loader) * epochs), 50000 // 1024 = 48 batches an epoch
    assert total_steps(cfg.train.epochs, 50_000 // cfg.train.batch_size) == 476
    assert total_steps(0.1, 30) == 3  # float noise (3.0000000000000004) does not add a step
    assert total_steps(2, 100, max_steps=150) == 150


def test_triangle_schedule_matches_airbench_every_step():
    cfg = fast94()
    assert cfg.optim.schedule == "triangle"
    ref = airbench_triangle(476, start=0.2, end=0.07, peak=0.23)
    ours = torch.tensor([lr_factor(s, 476, cfg.optim) for s in range(477)])
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


def test_triangle_schedule_drives_the_optimizer_lr():
    cfg = fast94()
    opt = build_optimizer(build_model("airbench", 3, 10, 32), cfg.optim, torch.device("cpu"))
    sched = build_schedule(opt, 476, cfg.optim)
    lrs = []
    for _ in range(476):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert lrs[0][0] == pytest.approx(0.2 * 1.5) and lrs[109][0] == pytest.approx(1.5)
    assert lrs[-1][0] == pytest.approx(1.5 * (1 + (0.07 - 1) * 366 / 367))
    assert all(g[1] == pytest.approx(64 * g[0]) for g in lrs)  # the BatchNorm group keeps its 64x


def test_64x_group_is_batchnorm_biases_only():
    cfg = fast94()
    m = build_model("airbench", 3, 10, 32)
    names = {id(p): n for n, p in m.named_parameters()}
    groups = param_groups(m, cfg.optim)
    fast = [g for g in groups if g["lr"] == pytest.approx(64 * cfg.optim.lr)]
    assert len(fast) == 1
    fast_names = sorted(names[id(p)] for p in fast[0]["params"])
    # airbench: [p for k, p in model.named_parameters() if 'norm' in k and p.requires_grad]
    assert fast_names == sorted(n for n, p in m.named_parameters() if "norm" in n and p.requires_grad)
    assert all(n.endswith(".bias") for n in fast_names) and len(fast_names) == 6
    base = {names[id(p)] for g in groups if g is not fast[0] for p in g["params"]}
    assert "whiten.bias" in base and "head.weight" in base  # the whitening bias trains at the base LR
    # every trainable parameter is in exactly one group
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in m.parameters() if p.requires_grad)


def test_weight_decay_per_step_is_the_same_for_every_group():
    cfg = fast94()
    groups = param_groups(build_model("airbench", 3, 10, 32), cfg.optim)
    # airbench: wd = 0.0153 * 1024 / (1024 * (1 + 1 / (1 - 0.85))), for every group, biases included
    assert len(groups) == 3
    for g in groups:
        assert g["lr"] * g["weight_decay"] == pytest.approx(0.0153 * 1024 / (1024 * (1 + 1 / 0.15)), rel=1e-5)
    cfg.optim.bias_decay = False  # the default recipe's convention: biases and norms undecayed
    for g in param_groups(build_model("airbench", 3, 10, 32), cfg.optim):
        assert (g["weight_decay"] > 0) == all(p.ndim > 1 for p in g["params"])


def airbench_optimizer(model, batch_size=1024):
    """lib_airbench94 hyp + utils.train's optimizer construction, verbatim in substance."""
    lr_hyp, momentum, wd_hyp, bias_scaler = 11.5, 0.85, 0.0153, 64.0
    kilostep_scale = 1024 * (1 + 1 / (1 - momentum))
    lr = lr_hyp / kilostep_scale
    wd = wd_hyp * batch_size / kilostep_scale
    lr_biases = lr * bias_scaler
    norm_biases = [p for k, p in model.named_parameters() if "norm" in k and p.requires_grad]
    other_params = [p for k, p in model.named_parameters() if "norm" not in k and p.requires_grad]
    return torch.optim.SGD(
        [
            dict(params=norm_biases, lr=lr_biases, weight_decay=wd / lr_biases),
            dict(params=other_params, lr=lr, weight_decay=wd / lr),
        ],
        momentum=momentum,
        nesterov=True,
    )


def test_optimizer_steps_match_airbench():
    """Three SGD steps of ours (mean loss, lr 1.5 per 1024 images) and airbench's (summed loss, lr per
    kilostep) from the same weights on the same batch give the same weights: LR, momentum, groups and
    decay agree, and so does the batch-size rule (scale --lr with the batch, keep --weight-decay)."""
    cfg, batch = fast94(), 64
    cfg.optim.lr *= batch / 1024
    torch.manual_seed(0)
    ours = build_model("airbench", 3, 10, 12)
    theirs, init = copy.deepcopy(ours), copy.deepcopy(ours)
    x, y = torch.randn(batch, 3, 12, 12), torch.randint(0, 10, (batch,))
    opt_a = build_optimizer(ours, cfg.optim, torch.device("cpu"))
    opt_b = airbench_optimizer(theirs, batch)
    for _ in range(3):
        F.cross_entropy(ours(x), y, label_smoothing=0.2).backward()
        F.cross_entropy(theirs(x), y, label_smoothing=0.2, reduction="sum").backward()
        opt_a.step(), opt_b.step()
        opt_a.zero_grad(), opt_b.zero_grad()
    for (n, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5, msg=n)
    moved = [n for (n, a), b in zip(ours.named_parameters(), init.parameters()) if not torch.equal(a, b)]
    assert "whiten.bias" in moved and "layers.0.norm1.bias" in moved and "head.weight" in moved


def test_whitening_sample_is_uniform_over_a_class_sorted_set():
    _, y = class_sorted_images(per_class=500)
    idx = init_sample(len(y), 1000, seed=0)
    counts = torch.bincount(y[idx], minlength=10)
    assert counts.min() >= 60 and counts.max() <= 140, counts  # a prefix would be 500 of class 0, 500 of 1
    assert len(set(idx.tolist())) == 1000  # without replacement
    assert torch.equal(idx, init_sample(len(y), 1000, seed=0))  # every rank draws the same images
    assert not torch.equal(idx, init_sample(len(y), 1000, seed=1))


def test_normalization_uses_the_whole_training_set():
    x, _ = class_sorted_images()
    mean, std = normalization_stats(x, "dataset")
    ref = x.double() / 255
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.float64), ref.mean((0, 2, 3)), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(
        torch.tensor(std, dtype=torch.float64), ref.transpose(0, 1).reshape(3, -1).std(1), rtol=1e-7, atol=1e-9
    )
    assert abs(mean[0] - ref[:1000].mean().item()) > 0.05  # the first 5 classes would give another mean


def test_fractional_epochs_flag():
    parser = C.ArgumentParser(prog="train.py")
    C.add_arguments(parser)
    cfg = C.from_args(parser.parse_args(["--epochs", "9.9", "--schedule", "triangle", "--lr-start", "0.2"]))
    assert cfg.train.epochs == 9.9 and cfg.optim.schedule == "triangle"
    with pytest.raises(C.UserError, match="lr-start"):
        C.from_args(parser.parse_args(["--lr-start", "1.5"]))


# ---------------------------------------------------------------------------------------------------
# Against the `airbench` package itself (a dev dependency; pure Python). Its network is built on the CPU
# in float32: make_net94 calls .half().cuda(), which these tests turn into no-ops while it builds.


@pytest.fixture
def airbench():
    return pytest.importorskip("airbench")


def airbench_net():
    from airbench import lib_airbench94

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.Module, "half", lambda m: m)
        mp.setattr(torch.nn.Module, "cuda", lambda m, *a, **k: m)
        return lib_airbench94.make_net94()


def ours_from(net) -> torch.nn.Module:
    """Our airbench model holding the weights (and BatchNorm statistics) of airbench's Sequential."""
    ours = build_model("airbench", 3, 10, 32)
    theirs = list(net.state_dict().values())
    ours_sd = ours.state_dict()
    assert [tuple(v.shape) for v in ours_sd.values()] == [tuple(v.shape) for v in theirs]
    ours.load_state_dict(dict(zip(ours_sd, theirs)))
    return ours


def test_network_matches_airbench(airbench):
    torch.manual_seed(0)
    net = airbench_net()
    for m in net.modules():  # non-trivial statistics and shifts, so eval mode tests them too
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1), m.running_var.uniform_(0.5, 2), m.bias.data.normal_(0, 0.1)
    ours = ours_from(net)
    assert [p.requires_grad for p in ours.parameters()] == [p.requires_grad for p in net.parameters()]
    x = torch.randn(8, 3, 32, 32)
    for mode in (True, False):
        net.train(mode), ours.train(mode)
        torch.testing.assert_close(ours(x), net(x), rtol=1e-4, atol=1e-5)


def test_whitening_matches_airbench(airbench):
    from airbench.utils import init_whitening_conv

    torch.manual_seed(0)
    x = torch.rand(200, 3, 32, 32)
    x = x + 0.5 * x.roll(1, dims=-1)  # correlated neighbours, so the whitening is far from the identity
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    net = airbench_net()
    init_whitening_conv(net[0], x)
    ours = build_model("airbench", 3, 10, 32)
    ours.init_from_data(x)
    a, b = ours.whiten.weight.flatten(1), net[0].weight.data.flatten(1)
    # an eigenvector's sign is arbitrary: filter i may be airbench's i or its negative (filter i + 12)
    sign = torch.sign((a[:12] * b[:12]).sum(1, keepdim=True))
    torch.testing.assert_close(a[:12] * sign, b[:12], rtol=1e-2, atol=1e-3)  # float32 vs float64
    torch.testing.assert_close(a[12:] * sign, b[12:], rtol=1e-2, atol=1e-3)


def test_lookahead_matches_airbench(airbench):
    from airbench.utils import LookaheadState

    from dist_cnn.train.optim import Lookahead

    torch.manual_seed(0)
    net, total = airbench_net(), 23
    ours = ours_from(net)
    theirs_la, ours_la = LookaheadState(net), Lookahead(ours, every=5, decay=0.95, total_steps=total)
    alpha = 0.95**5 * (torch.arange(total + 1) / total) ** 3  # utils.train's alpha_schedule
    x = torch.randn(16, 3, 32, 32)
    for step in range(1, total + 1):
        with torch.no_grad():  # the same "training step" on both: a weight change and new BN statistics
            for model in (net, ours):
                for p in model.parameters():
                    p.add_(0.01 * torch.sin(p + step))
        net(x), ours(x)
        if step % 5 == 0:
            theirs_la.update(net, decay=alpha[step].item())
        if step == total:
            theirs_la.update(net, decay=1.0)
        ours_la.step(step)
        for a, b in zip(ours.state_dict().values(), net.state_dict().values()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_tta_matches_airbench(airbench):
    from types import SimpleNamespace

    from airbench.utils import infer

    from dist_cnn.models.registry import tta_logits

    torch.manual_seed(0)
    ours = build_model("airbench", 3, 10, 32).eval()
    x = torch.randn(6, 3, 32, 32)
    loader = SimpleNamespace(images=x, normalize=lambda v: v)
    with torch.no_grad():
        for level in (0, 1, 2):
            torch.testing.assert_close(tta_logits(ours, x, level), infer(ours, loader, level), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(tta_logits(ours, x, 2), tta_logits(ours, x, 1))
