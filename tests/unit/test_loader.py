"""dist_cnn.data.loader: the epoch plan and its rank slices, the batched crop/flip, the fused normalize."""

import numpy as np
import pytest
import torch

from dist_cnn.data.loader import (
    Augment,
    DevicePipeline,
    LoaderPipeline,
    Normalize,
    crop_flip,
    crop_flip_at,
    crop_windows,
    epoch_plan,
    eval_shard,
    normalization_stats,
    rank_slice,
)

N, GLOBAL_BATCH = 1000, 32
AUG = Augment(crop_padding=2, flip=True)


def rank_indices(plan, step, world):
    """Each rank's plan positions and image indices at `step`, for a global batch of GLOBAL_BATCH."""
    b = GLOBAL_BATCH // world
    return [plan["perm"][rank_slice(step, b, r, world)] for r in range(world)]


# ------------------------------------------------------------------------------ epoch_plan + rank_slice


def test_plan_is_a_pure_function_of_seed_and_epoch():
    a, b = epoch_plan(N, 3, 1, AUG), epoch_plan(N, 3, 1, AUG)
    assert a.keys() == b.keys() == {"perm", "shift", "flip"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(a["perm"].tolist()) == list(range(N))  # a permutation
    assert not torch.equal(a["perm"], epoch_plan(N, 3, 2, AUG)["perm"])  # another epoch, another order
    assert not torch.equal(a["perm"], epoch_plan(N, 4, 1, AUG)["perm"])  # another seed, another order
    assert a["shift"].shape == (N, 2) and a["shift"].min() == 0 and a["shift"].max() == 2 * AUG.crop_padding
    assert 0.4 < a["flip"].float().mean() < 0.6


def test_plan_without_augmentation_has_no_draws():
    assert epoch_plan(N, 0, 0, Augment()).keys() == {"perm"}


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank_shards_are_disjoint_and_cover_the_global_batch(world):
    plan = epoch_plan(N, 0, 0, AUG)
    seen = []
    for step in range(N // GLOBAL_BATCH):
        shards = rank_indices(plan, step, world)
        assert all(len(s) == GLOBAL_BATCH // world for s in shards)
        union = torch.cat(shards).tolist()
        assert len(set(union)) == GLOBAL_BATCH, f"step {step}: ranks overlap"
        assert set(union) == set(plan["perm"][step * GLOBAL_BATCH : (step + 1) * GLOBAL_BATCH].tolist())
        seen += union
    assert len(set(seen)) == len(seen) == (N // GLOBAL_BATCH) * GLOBAL_BATCH  # no image twice in an epoch


def test_global_batch_is_the_same_at_world_size_1_2_4():
    plan = epoch_plan(N, 5, 2, AUG)
    for step in range(N // GLOBAL_BATCH):
        one = rank_indices(plan, step, 1)[0]
        for world in (2, 4):
            assert torch.equal(torch.cat(rank_indices(plan, step, world)), one), (step, world)


def test_rank_slice_positions():
    assert rank_slice(0, 8, 0, 1) == slice(0, 8)
    assert rank_slice(3, 8, 1, 4) == slice(3 * 32 + 8, 3 * 32 + 16)


def test_alternate_flip_flips_each_image_in_alternate_epochs():
    aug = Augment(flip=True, alternate_flip=True)

    def flips_by_image(epoch):
        plan = epoch_plan(N, 7, epoch, aug)
        out = torch.empty(N, dtype=torch.bool)
        out[plan["perm"]] = plan["flip"]  # the plan stores draws by position; back to image order
        return out

    f0, f1, f2 = flips_by_image(0), flips_by_image(1), flips_by_image(2)
    assert torch.equal(f1, ~f0) and torch.equal(f2, f0)
    assert 0.4 < f0.float().mean() < 0.6  # a per-image start, not all the same


def small_images(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(n) % 10


def pipelines(world, rank=0, kind="device", channels_last=False):
    x, y = small_images()
    norm = Normalize([0.5] * 3, [0.25] * 3, torch.device("cpu"), channels_last=channels_last)
    kw = dict(
        batch_per_rank=16 // world, rank=rank, world=world, seed=1, aug=AUG, normalize=norm, device=torch.device("cpu")
    )
    if kind == "device":
        return DevicePipeline(x, y, **kw)
    return LoaderPipeline(x, y, workers=0, **kw)


@pytest.mark.parametrize("kind", ["device", "dataloader"])
def test_resume_mid_epoch_replays_the_uninterrupted_batches(kind):
    p = pipelines(world=2, rank=1, kind=kind)
    full = list(p.epoch(3))
    assert len(full) == p.steps_per_epoch == 96 // 16
    resumed = list(pipelines(world=2, rank=1, kind=kind).epoch(3, start_step=4))
    assert len(resumed) == len(full) - 4
    for (xa, ya), (xb, yb) in zip(full[4:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("channels_last", [False, True])
def test_both_pipelines_and_all_world_sizes_see_the_same_global_batch(channels_last):
    # the device pipeline stores the set in the model's layout; the DataLoader's batches are NCHW
    one = list(pipelines(world=1, channels_last=channels_last).epoch(2))
    for kind in ("device", "dataloader"):
        per_rank = [list(pipelines(world=4, rank=r, kind=kind, channels_last=channels_last).epoch(2)) for r in range(4)]
        for step, (x1, y1) in enumerate(one):
            x4 = torch.cat([per_rank[r][step][0] for r in range(4)])
            y4 = torch.cat([per_rank[r][step][1] for r in range(4)])
            assert torch.equal(y4, y1) and torch.equal(x4, x1), (kind, step)


# ------------------------------------------------------------------------------ crop_flip


def naive_crop_flip(x, shift, flip, pad):
    """One image at a time, with numpy's reflect padding (the edge pixel is not repeated)."""
    out = []
    for i, img in enumerate(x.numpy()):
        if shift is not None:
            h, w = img.shape[1:]
            padded = np.pad(img, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
            dy, dx = int(shift[i, 0]), int(shift[i, 1])
            img = padded[:, dy : dy + h, dx : dx + w]
        if flip is not None and bool(flip[i]):
            img = img[:, :, ::-1]
        out.append(np.ascontiguousarray(img))
    return torch.from_numpy(np.stack(out))


@pytest.mark.parametrize("pad", [1, 3])
def test_crop_flip_matches_a_per_image_loop(pad):
    g = torch.Generator().manual_seed(pad)
    x = torch.randint(0, 256, (24, 3, 7, 10), dtype=torch.uint8, generator=g)  # not square: rows != cols
    shift = torch.randint(0, 2 * pad + 1, (24, 2), generator=g)
    flip = torch.rand(24, generator=g) < 0.5
    shift[0], shift[1], flip[:2] = torch.tensor([0, 2 * pad]), torch.tensor([2 * pad, 0]), torch.tensor([True, False])
    got = crop_flip(x, shift, flip, pad)
    assert got.dtype == torch.uint8 and got.shape == x.shape
    assert torch.equal(got, naive_crop_flip(x, shift, flip, pad))
    assert torch.equal(crop_flip(x, shift, None, pad), naive_crop_flip(x, shift, None, pad))
    assert torch.equal(crop_flip(x, None, flip, 0), naive_crop_flip(x, None, flip, 0))


def test_crops_from_the_set_padded_once_match_the_per_image_loop():
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, 256, (30, 3, 7, 10), dtype=torch.uint8, generator=g)
    windows = crop_windows(x, 2)
    idx = torch.tensor([29, 0, 5, 5, 17])  # any order, repeats allowed
    shift = torch.randint(0, 5, (5, 2), generator=g)
    flip = torch.tensor([True, False, True, True, False])
    assert torch.equal(crop_flip_at(windows, idx, shift, flip), naive_crop_flip(x[idx], shift, flip, 2))
    assert torch.equal(crop_flip_at(windows, idx, shift, None), naive_crop_flip(x[idx], shift, None, 2))


def test_crop_flip_identity_draws():
    x, _ = small_images(8)
    centre = torch.full((8, 2), 2)
    assert torch.equal(crop_flip(x, centre, torch.zeros(8, dtype=torch.bool), 2), x)
    assert torch.equal(crop_flip(x, None, None, 0), x)


# ------------------------------------------------------------------------------ Normalize


@pytest.mark.parametrize("channels_last", [False, True])
def test_normalize_is_the_obvious_formula(channels_last):
    x, _ = small_images(6)
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    got = Normalize(mean, std, torch.device("cpu"), channels_last)(x)
    want = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert got.is_contiguous(memory_format=fmt)
    assert got.is_contiguous() != channels_last  # channels_last of a 3-channel 8x8 batch is not NCHW-contiguous


@pytest.mark.parametrize("channels", [1, 3])
def test_normalize_gives_the_same_bits_from_either_input_layout(channels):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (5, channels, 7, 9), dtype=torch.uint8, generator=g)
    mean, std = [0.49, 0.48, 0.45][:channels], [0.25, 0.24, 0.26][:channels]
    nchw = Normalize(mean, std, torch.device("cpu"), channels_last=False)(x)
    for layout in (torch.contiguous_format, torch.channels_last):
        got = Normalize(mean, std, torch.device("cpu"), channels_last=True)(x.contiguous(memory_format=layout))
        assert torch.equal(got, nchw) and got.is_contiguous(memory_format=torch.channels_last)


def test_normalization_stats():
    x, _ = small_images(50)
    assert normalization_stats(x, "half") == ([0.5] * 3, [0.5] * 3)
    mean, std = normalization_stats(x, "dataset")
    xf = x.double() / 255
    torch.testing.assert_close(torch.tensor(mean, dtype=torch.double), xf.mean(dim=(0, 2, 3)), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(std, dtype=torch.double), xf.std(dim=(0, 2, 3)), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ eval_shard


@pytest.mark.parametrize("n", [0, 1, 7, 499, 500, 10001])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 8])
def test_eval_shards_cover_the_test_set_exactly_once(n, world):
    shards = [eval_shard(n, r, world) for r in range(world)]
    assert shards[0].start == 0 and shards[-1].stop == n
    for a, b in zip(shards, shards[1:]):
        assert a.stop == b.start, (a, b)  # contiguous, no gap, no overlap
    sizes = [s.stop - s.start for s in shards]
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1 and min(sizes) >= 0
    covered = [i for s in shards for i in range(s.start, s.stop)]
    assert covered == list(range(n))
