"""Model registry, architectures, airbench whitening and TTA. CPU only, a few seconds."""

import pytest
import torch
import torch.nn.functional as F

from dist_cnn.errors import UserError
from dist_cnn.models import registry as models
from dist_cnn.models.registry import MODELS, build_model, register, tta_logits, whitening_weights


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def correlated_images(n=400, c=3, size=16, seed=0):
    """Zero-mean images with strong spatial and channel correlation, so whitening has work to do."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, size + 1, size + 1, generator=g)
    x = x[..., 1:, 1:] + 0.8 * x[..., :-1, :-1] + 0.5 * x[..., 1:, :-1]
    mix = torch.tensor([[1.0, 0.5, 0.2], [0.0, 1.0, 0.6], [0.0, 0.0, 1.0]])[:c, :c]
    x = torch.einsum("dc,nchw->ndhw", mix, x)
    return x - x.mean((0, 2, 3), keepdim=True)


def test_seed_is_the_261982_param_net():
    m = build_model("seed", 3, 10, 32)
    assert n_params(m) == 261_982
    assert m.fc1.in_features == 2048
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("layer", ["conv1", "conv2", "fc1", "fc2"])
def test_seed_has_relu_after(layer):
    # with a hugely negative bias, a ReLU after `layer` outputs zeros whatever the input
    m = build_model("seed", 3, 10, 32)
    with torch.no_grad():
        getattr(m, layer).bias.fill_(-1e3)
        a, b = m(torch.randn(2, 3, 32, 32)), m(torch.randn(2, 3, 32, 32))
    assert torch.equal(a, b)


@pytest.mark.parametrize("c,size,k", [(1, 28, 10), (3, 32, 100)])
def test_seed_adapts_to_channels_size_classes(c, size, k):
    m = build_model("seed", c, k, size)
    assert m.fc1.in_features == 32 * (size // 4) ** 2
    assert m(torch.randn(2, c, size, size)).shape == (2, k)


def test_resnet18_shape_and_params():
    m = build_model("resnet18", 3, 10, 32)
    assert n_params(m) == 11_173_962  # the usual CIFAR ResNet-18 figure (~11.17M)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_airbench_shape_and_frozen_parts():
    m = build_model("airbench", 3, 10, 32)
    assert m.whiten.weight.shape == (24, 3, 2, 2)
    assert not m.whiten.weight.requires_grad and m.whiten.bias.requires_grad
    bns = [mod for mod in m.modules() if isinstance(mod, torch.nn.BatchNorm2d)]
    assert len(bns) == 6 and all(abs(b.momentum - 0.4) < 1e-9 and not b.weight.requires_grad for b in bns)
    w = m.layers[1].conv2.weight  # airbench's implicit residual: the first filters start as identity
    assert torch.equal(w[:256], torch.nn.init.dirac_(torch.empty(256, 256, 3, 3)))
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert build_model("airbench", 1, 10, 28)(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert build_model("airbench", 3, 10, 9)(torch.randn(2, 3, 9, 9)).shape == (2, 10)  # the smallest
    with pytest.raises(UserError):
        build_model("airbench", 3, 10, 8)


def test_whitening_gives_identity_covariance():
    x = correlated_images()
    m = build_model("airbench", 3, 10, 16)
    m.init_from_data(x)
    out = F.conv2d(x, m.whiten.weight[:12])  # the positive half, without the (trainable) bias
    out = out.permute(0, 2, 3, 1).reshape(-1, 12)
    cov = out.T @ out / len(out)
    # eps=5e-4 against eigenvalues >= 0.5 leaves a bias of at most ~1e-3 on the diagonal
    assert (cov - torch.eye(12)).abs().max() < 5e-3
    assert (torch.cov(out.T) - torch.eye(12)).abs().max() < 2e-2  # the data is ~zero mean


def test_whitening_weights_are_scaled_eigenvectors():
    x, eps = correlated_images(n=200, seed=1), 0.3  # a large eps, so a missing +eps shows
    w = whitening_weights(x, eps=eps)
    assert w.shape == (24, 3, 2, 2)
    assert torch.equal(w[12:], -w[:12])
    p = F.unfold(x.double(), 2).transpose(1, 2).reshape(-1, 12)  # patches in (c, h, w) order, as the weights
    cov = p.T @ p / len(p)
    lam = torch.linalg.eigvalsh(cov).flip(0)  # descending, as airbench orders the filters
    v = w[:12].reshape(12, 12).double() * torch.sqrt(lam + eps)[:, None]
    assert torch.allclose(v @ v.T, torch.eye(12, dtype=torch.double), atol=1e-4)  # orthonormal
    assert torch.allclose(v @ cov @ v.T, torch.diag(lam), atol=1e-4)  # eigenvectors, in order


def test_tta_levels():
    torch.manual_seed(0)
    m = build_model("airbench", 3, 10, 16).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(tta_logits(m, x, 0), m(x))
        l1 = tta_logits(m, x, 1)
        assert torch.allclose(l1, 0.5 * m(x) + 0.5 * m(x.flip(-1)))
        assert torch.allclose(tta_logits(m, x.flip(-1), 1), l1, atol=1e-6)  # mirror-invariant
        l2 = tta_logits(m, x, 2)
        # six views: plain and one pixel up-left / down-right (reflect padded), each also mirrored
        p = F.pad(x, (1, 1, 1, 1), mode="reflect")
        views = [x, p[..., :16, :16], p[..., 2:, 2:]]
        views += [v.flip(-1) for v in views]
        weights = [0.25, 0.125, 0.125] * 2
        assert torch.allclose(l2, sum(w * m(v) for w, v in zip(weights, views)), atol=1e-6)
        assert not torch.allclose(l2, l1, atol=1e-4)  # the translated views count
    with pytest.raises(UserError):
        tta_logits(m, x, 3)


def test_unknown_model_is_a_user_error():
    with pytest.raises(UserError, match="known models: airbench, resnet18, seed") as e:
        build_model("vgg", 3, 10, 32)
    assert "\n" not in str(e.value)


def test_register_makes_build_model_find_it():
    @register("tiny_test_net")
    def tiny(in_channels, num_classes, image_size):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(in_channels * image_size**2, num_classes))

    try:
        assert build_model("tiny_test_net", 1, 5, 4)(torch.randn(2, 1, 4, 4)).shape == (2, 5)
        with pytest.raises(ValueError):
            register("tiny_test_net")(tiny)
    finally:
        del MODELS["tiny_test_net"]


# small images keep this fast on a CPU
@pytest.mark.parametrize(
    "name,size,lr,steps", [("seed", 16, 0.05, 8), ("resnet18", 8, 0.05, 3), ("airbench", 16, 0.5, 4)]
)
def test_trains_fp32_and_runs_bf16(name, size, lr, steps):
    torch.manual_seed(0)
    m = build_model(name, 3, 10, size)
    x, y = torch.randn(8, 3, size, size), torch.randint(0, 10, (8,))
    if hasattr(m, "init_from_data"):
        m.init_from_data(x)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.eval()(x)
    assert out.dtype == torch.bfloat16 and out.shape == (8, 10) and torch.isfinite(out).all()


def test_model_help_lists_builtins_and_spec_forms():
    from dist_cnn.config import train_parser  # --model takes a built-in (from the registry) or a spec

    text = " ".join(train_parser().format_help().split())
    assert all(name in text for name in models.MODELS)
    assert all(form in text for form in ("torchvision:NAME", "timm:NAME", "package.module:factory"))
