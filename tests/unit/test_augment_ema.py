"""Recipe augmentations (seeded per position) and model EMA. In-process, CPU."""

import pytest
import torch
from torchvision.transforms import v2

from dist_cnn.data.augment import BatchMix, ImageAugment, draw_seed
from dist_cnn.train.ema import ModelEMA, adjusted_decay


def images(n=6, size=16, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.mark.parametrize("auto", ["ra", "ta_wide", "augmix"])
def test_image_augment_is_a_function_of_seed_epoch_position(auto):
    x = images()
    aug = ImageAugment(auto, 0.5, seed=3, fill=(0.5, 0.5, 0.5))
    state = torch.get_rng_state()
    a = aug(x, epoch=1, positions=range(10, 16))
    assert torch.equal(torch.get_rng_state(), state)  # the caller's stream is untouched
    assert a.dtype == torch.uint8 and a.shape == x.shape and not torch.equal(a, x)
    # the same image at the same position, in another batch (another world size), gets the same draws
    b = aug(x[3:], epoch=1, positions=range(13, 16))
    assert torch.equal(a[3:], b)
    assert torch.equal(aug.one(x[4], 1, 14), a[4])
    assert not torch.equal(aug(x, epoch=2, positions=range(10, 16)), a)  # a new epoch, new draws
    assert not torch.equal(ImageAugment(auto, 0.5, seed=4, fill=(0.5,) * 3)(x, 1, range(10, 16)), a)


def test_random_erase_fills_with_the_mean_colour():
    x = torch.full((8, 3, 16, 16), 7, dtype=torch.uint8)
    aug = ImageAugment("none", 1.0, seed=0, fill=(0.2, 0.4, 0.6))
    out = aug(x, 0, range(8))
    erased = out != 7
    assert erased.any(dim=(1, 2, 3)).all()  # p=1: every image
    for c, value in enumerate((51, 102, 153)):
        assert (out[:, c][erased[:, c]] == value).all()
    assert not ImageAugment("none", 0.0, seed=0, fill=(0, 0, 0))  # nothing to do: falsy, identity
    assert torch.equal(ImageAugment("none", 0.0, seed=0, fill=(0, 0, 0))(x, 0, range(8)), x)


@pytest.mark.parametrize("mixup,cutmix", [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_batch_mix_soft_labels_and_determinism(mixup, cutmix):
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 5
    mix = BatchMix(mixup, cutmix, 5, seed=0, rank=1)
    state = torch.get_rng_state()
    xa, ya = mix(x, y, epoch=0, step=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert ya.shape == (8, 5) and torch.allclose(ya.sum(1), torch.ones(8))
    xb, yb = mix(x, y, epoch=0, step=3)
    assert torch.equal(xa, xb) and torch.equal(ya, yb)
    draws = {round(float(mix(x, y, 0, s)[1].max()), 6) for s in range(6)}
    assert len(draws) > 1  # each step draws its own lambda
    # a soft-target loss: cross_entropy takes the probabilities directly
    loss = torch.nn.functional.cross_entropy(torch.randn(8, 5), ya)
    assert torch.isfinite(loss)


def test_batch_mix_uses_torchvision_mixup():
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    ours = BatchMix(0.4, 0.0, 4, seed=5, rank=0)(x, y, 2, 7)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(draw_seed(2, 5, 2, 7, 0))
        ref = v2.MixUp(alpha=0.4, num_classes=4)(x, y)
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])


def test_ema_follows_the_formula_and_restores():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    ema = ModelEMA(model, decay=0.9, every=2, warmup_steps=2)
    expected = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    for step in range(1, 9):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model(torch.randn(8, 4))  # moves the BatchNorm statistics, which are averaged too
        ema.update(model, step)
        if step % 2 == 0:
            for k, v in model.state_dict().items():
                if k in expected:
                    # warmup resets the count, so the first update after it copies too (as the reference)
                    expected[k] = v.clone() if step <= 4 else 0.9 * expected[k] + 0.1 * v
    got = ema.module.state_dict()
    for k, v in expected.items():
        assert torch.allclose(got[k], v, atol=1e-6), k
    again = ModelEMA(model, decay=0.9, every=2, warmup_steps=2)
    again.load_state_dict(ema.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ema.state_dict().values()))
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_adjusted_decay_as_torchvision_reference():
    # the ResNet-50 recipe: 8 GPUs x 128, every 32 steps, 600 epochs, decay 0.99998
    assert adjusted_decay(0.99998, 1024, 32, 600) == pytest.approx(1 - 2e-5 * 1024 * 32 / 600)
    assert adjusted_decay(0.5, 1024, 32, 1) == 0.0


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")],
        ),
    ],
)
def test_ema_count_lives_on_the_model_device(device):
    """AveragedModel's n_averaged on the model's device: no host-to-device copy at each update."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)).to(device)
    ema = ModelEMA(model, decay=0.9, every=1, warmup_steps=0)
    for step in (1, 2):
        ema.update(model, step)
    assert ema.avg.n_averaged.device.type == device and int(ema.avg.n_averaged) == 2
    assert all(p.device.type == device for p in ema.module.parameters())
