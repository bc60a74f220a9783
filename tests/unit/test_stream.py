"""Streaming image folders in-process: the file index, per-image draws, shards and bad files (the
decoder itself: test_decode.py)."""

import numpy as np
import pytest
import torch
from PIL import Image

from dist_cnn.config import DataConfig, parse_crop_scale
from dist_cnn.data.decode import read_file as decode_file
from dist_cnn.data.folder import scan_folder
from dist_cnn.data.loader import Augment, Normalize, eval_shard
from dist_cnn.data.open import fits_in_memory
from dist_cnn.data.source import Recipe
from dist_cnn.data.stream import StreamEval, StreamImages, StreamPipeline, sample_stats
from dist_cnn.distributed.process_group import DistEnv, rank0_only
from dist_cnn.errors import UserError
from dist_cnn.train.evaluate import evaluate_batches
from tests.support.dist import run_group

CPU = torch.device("cpu")
CROPS = Recipe(16, train_crop="random-resized", eval_resize="center-crop")  # the ImageNet-style recipe


def centre(size=16, ratio=0.875):
    return Recipe(size, eval_resize="center-crop", eval_crop_ratio=ratio)


def write_folder(root, n_train=(7, 5), n_test=(3, 4), size=(40, 28), split="test", ext=".jpg", smooth=False):
    """Two classes of random images of mixed sizes (w x h); returns the root. smooth: random colour
    gradients instead of noise (see smooth_image)."""
    rng = np.random.default_rng(0)
    for split_name, counts in (("train", n_train), (split, n_test)):
        for c, n in zip(("cat", "dog"), counts):
            d = root / split_name / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = size[0] + i % 3, size[1] + 2 * (i % 2)
                pixels = smooth_image(rng, h, w) if smooth else rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i:03d}{ext}")
    return root


def smooth_image(rng, h: int, w: int) -> np.ndarray:
    """A random colour gradient: no detail at the pixel scale. JPEG decoders differ most there (libjpeg's
    "fancy" chroma upsampling against nvjpeg's, on 4:2:0 JPEGs such as PIL's default): on noise a pixel
    can differ by tens of levels, on smooth images by the IDCT's and the interpolation's rounding."""
    ys, xs = np.mgrid[0:h, 0:w] / max(h, w)
    a, b, c = (rng.uniform(40, 215, 3), rng.uniform(-80, 80, 3), rng.uniform(-80, 80, 3))
    return np.clip(a + b * ys[..., None] + c * xs[..., None], 0, 255).astype(np.uint8)


def no_norm():
    return Normalize([0.0] * 3, [1 / 255] * 3, CPU, channels_last=False)  # x -> float(x)


def pipeline(files, batch=2, rank=0, world=1, workers=0, aug=Augment(flip=True), recipe=CROPS, **kw):
    return StreamPipeline(
        files,
        recipe,
        batch_per_rank=batch,
        rank=rank,
        world=world,
        seed=3,
        aug=aug,
        normalize=no_norm(),
        device=CPU,
        workers=workers,
        **kw,
    )


def test_scan_sorted_layout_and_compact_paths(tmp_path):
    root = write_folder(tmp_path / "d", split="val", ext=".JPEG")
    (root / "train" / "dog" / "notes.txt").write_text("not an image: ignored")
    idx = scan_folder(str(root), test_split="val")
    assert idx.classes == ["cat", "dog"] and len(idx.train) == 12 and len(idx.test) == 7
    assert idx.train.paths.dtype.kind == "S" and idx.train.labels.tolist() == [0] * 7 + [1] * 5
    assert idx.train.path(7).endswith("train/dog/000.JPEG") and idx.test.path(0).endswith("val/cat/000.JPEG")
    with pytest.raises(UserError, match="test not found.*--test-split"):
        scan_folder(str(root))


def test_crop_draws_are_a_function_of_seed_epoch_index(tmp_path):
    idx = scan_folder(str(write_folder(tmp_path / "d")))
    ds = StreamImages(idx.train, CROPS, train=True, seed=3)
    a, b = ds[(0, 5)].image, ds[(0, 5)].image
    assert a.shape == (3, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a, ds[(1, 5)].image)  # another epoch, another crop
    other = StreamImages(idx.train, CROPS, train=True, seed=4)
    assert not torch.equal(a, other[(0, 5)].image)
    rng_before = torch.get_rng_state()
    ds[(2, 3)]
    assert torch.equal(rng_before, torch.get_rng_state())  # the global generator is left alone
    whole = StreamImages(idx.train, Recipe(16, train_crop="random-resized", crop_scale=(1.0, 1.0)), train=True)
    assert whole.draws(0, 1, 28, 28) == (0, 0, 28, 28)  # scale 1 on a square image: the whole image


def test_eval_transform_resize_then_centre_crop(tmp_path):
    idx = scan_folder(str(write_folder(tmp_path / "d", size=(16, 16))))
    exact = StreamImages(idx.test, centre(16, 1.0), train=False)
    assert torch.equal(exact[(0, 0)].image, decode_file(idx.test.path(0)))  # 16x16 at ratio 1: untouched
    assert StreamImages(idx.test, centre(12), train=False)[(0, 1)].image.shape == (3, 12, 12)


def batches_of(pipe, epoch, start=0):
    return [(x.clone(), y.clone()) for x, y in pipe.epoch(epoch, start)]


def test_ranks_take_slices_of_the_global_batch_and_resume_replays(tmp_path):
    idx = scan_folder(str(write_folder(tmp_path / "d")))
    one = pipeline(idx.train, batch=4)
    two = [pipeline(idx.train, batch=2, rank=r, world=2) for r in (0, 1)]
    assert one.steps_per_epoch == two[0].steps_per_epoch == 3
    full = batches_of(one, 1)
    halves = [batches_of(p, 1) for p in two]
    for step in range(3):
        assert torch.equal(full[step][0], torch.cat([halves[0][step][0], halves[1][step][0]]))
        assert torch.equal(full[step][1], torch.cat([halves[0][step][1], halves[1][step][1]]))
    assert torch.equal(batches_of(one, 1, start=2)[0][0], full[2][0])
    assert not torch.equal(batches_of(one, 0)[0][0], full[0][0])


def test_workers_give_the_same_batches(tmp_path):
    idx = scan_folder(str(write_folder(tmp_path / "d")))
    ref = batches_of(pipeline(idx.train, batch=4), 0)
    pipe = pipeline(idx.train, batch=4, workers=2)
    rng = torch.get_rng_state()
    batches_of(pipe, 1)
    assert torch.equal(rng, torch.get_rng_state())  # starting the loader draws nothing from the global generator
    for epoch in (0, 0):  # persistent workers, iterated twice
        got = batches_of(pipe, epoch)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ref, got))


def test_eval_shards_cover_each_test_image_once(tmp_path):
    idx = scan_folder(str(write_folder(tmp_path / "d", n_test=(5, 6))))
    seen = []
    for r in range(3):
        ev = StreamEval(idx.test, centre(), rank=r, world=3, device=CPU, workers=0, batch_size=2)
        ys = [y for _, y in ev.batches(no_norm())]
        assert sum(len(y) for y in ys) == len(range(11)[eval_shard(11, r, 3)])
        seen += torch.cat(ys).tolist()
    assert seen == idx.test.labels.tolist()


def _score_streamed(env, root):
    index = rank0_only(env, lambda: scan_folder(root))  # rank 0 lists
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 2))
    test = StreamEval(
        index.test,
        centre(),
        rank=env.rank,
        world=env.world_size,
        device=CPU,
        workers=0,
        batch_size=4,
    )
    norm = Normalize([0.5] * 3, [0.25] * 3, CPU, channels_last=False)
    return evaluate_batches(model, test.batches(norm), len(index.test), num_classes=2, env=env, precision="fp32")


def test_streamed_eval_in_a_3_process_group_equals_one_process(tmp_path):
    root = str(write_folder(tmp_path / "d", n_test=(8, 9)))
    three = run_group(3, _score_streamed, root, tmp_dir=tmp_path)
    one = _score_streamed(DistEnv(), root)
    assert one["test_total"] == 17 and all(r == one for r in three), (one, three)


def bad_folder(tmp_path):
    root = write_folder(tmp_path / "d", n_train=(4, 4), n_test=(2, 2))
    (root / "train" / "cat" / "001.jpg").write_bytes(b"")
    good = (root / "train" / "dog" / "000.jpg").read_bytes()
    (root / "train" / "dog" / "002.jpg").write_bytes(good[: len(good) // 2])
    (root / "train" / "dog" / "003.jpg").write_text("not an image")
    (root / "test" / "dog" / "001.jpg").write_bytes(b"")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_unreadable_file_is_one_line_naming_it(tmp_path, workers):
    idx = scan_folder(str(bad_folder(tmp_path)))
    with pytest.raises(UserError) as e:
        batches_of(pipeline(idx.train, batch=8, workers=workers), 0)
    msg = str(e.value)
    assert "\n" not in msg and "--skip-bad-images" in msg
    assert any(f"{name} (" in msg for name in ("cat/001.jpg", "dog/002.jpg", "dog/003.jpg")), msg


def test_skip_bad_images_replaces_deterministically_and_counts(tmp_path):
    idx = scan_folder(str(bad_folder(tmp_path)))
    pipe = pipeline(idx.train, batch=8, skip_bad=True)
    first = batches_of(pipe, 0)
    assert sorted(pipe.skipped) == [1, 6, 7]
    assert torch.equal(first[0][0], batches_of(pipeline(idx.train, batch=8, skip_bad=True, workers=1), 0)[0][0])
    # 001 -> 002 (cat), dog/002 and dog/003 -> the next readable in file order, wrapping: cat/000
    perm = pipe.plan["perm"].tolist()
    labels = first[0][1].tolist()
    assert labels[perm.index(7)] == 0 and labels[perm.index(6)] == 0 and labels[perm.index(1)] == 0
    ev = StreamEval(idx.test, centre(16, 1.0), rank=0, world=1, device=CPU, workers=0, skip_bad=True)
    ys = torch.cat([y for _, y in ev.batches(no_norm())])
    assert ys.tolist() == [0, 0, 1, -1] and ev.skipped == {3}  # left out of the score, counted


def test_sample_is_random_not_class_ordered(tmp_path):
    idx = scan_folder(str(write_folder(tmp_path / "d", n_train=(30, 30))))
    s = sample_stats(idx.train, centre(16, 1.0), 10, workers=0, keep=10)
    assert s.x.shape == (10, 3, 16, 16) and 0 < int(s.y.sum()) < 10  # both classes, not the first 10 (all cats)
    x = s.x.double() / 255
    assert np.allclose(s.mean, x.mean(dim=(0, 2, 3))) and np.allclose(s.std, x.std(dim=(0, 2, 3)))
    few = sample_stats(idx.train, centre(16, 1.0), 10, workers=1, keep=3)
    assert few.mean == s.mean and torch.equal(few.x, s.x[:3])


def test_memory_estimate(tmp_path):
    idx = scan_folder(str(write_folder(tmp_path / "d")))
    fits, why = fits_in_memory(idx, 224, CPU)
    assert fits and "19 images at 224 px" in why


@pytest.mark.parametrize("text,expected", [("0.08,1", (0.08, 1.0)), ("1", (1.0, 1.0)), (" 0.25, 0.5", (0.25, 0.5))])
def test_crop_scale(text, expected):
    assert parse_crop_scale(text) == expected


@pytest.mark.parametrize("text", ["0", "0.5,0.2", "a,b", "0.1,0.2,0.3", "1.5"])
def test_crop_scale_bad(text):
    with pytest.raises(UserError, match="--crop-scale"):
        parse_crop_scale(text)


def test_stream_needs_an_image_folder():
    from dist_cnn import config

    cfg = config.Config(data=DataConfig(loader="stream"))
    with pytest.raises(UserError, match="--loader stream reads image folders"):
        config.validate(cfg)


def test_padded_crops_on_the_batch(tmp_path):
    idx = scan_folder(str(write_folder(tmp_path / "d")))
    plain = batches_of(pipeline(idx.train, batch=4, aug=Augment(flip=True)), 0)
    padded = batches_of(pipeline(idx.train, batch=4, aug=Augment(crop_padding=2, flip=True)), 0)
    assert padded[0][0].shape == (4, 3, 16, 16) and torch.equal(padded[0][1], plain[0][1])
    assert not torch.equal(padded[0][0], plain[0][0])


HAS_CUDA = torch.cuda.is_available()


@pytest.mark.skipif(HAS_CUDA, reason="the CPU's one-line refusal")
def test_decode_gpu_needs_cuda(tmp_path):
    idx = scan_folder(str(write_folder(tmp_path / "d")))
    with pytest.raises(UserError, match="--decode gpu .* CUDA"):
        pipeline(idx.train, decode="gpu")


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: torch.cuda.is_available() is False here")
def test_decode_gpu_matches_cpu_decoding(tmp_path):
    """nvjpeg + GPU resize against libjpeg + CPU resize: the same crops and flips, pixels within rounding
    (smooth images: see smooth_image); a PNG in the batch is decoded by the worker."""
    root = write_folder(tmp_path / "d", size=(64, 48), smooth=True)
    Image.new("RGB", (50, 40), (10, 200, 30)).save(root / "train" / "cat" / "zz.png")
    idx = scan_folder(str(root))
    cuda = torch.device("cuda")
    kw = dict(
        batch_per_rank=4,
        rank=0,
        world=1,
        seed=3,
        aug=Augment(flip=True),
        normalize=Normalize([0.0] * 3, [1 / 255] * 3, cuda, channels_last=False),
        device=cuda,
        workers=1,
    )
    recipe = Recipe(32, train_crop="random-resized", eval_resize="center-crop")
    cpu = [(x.cpu(), y.cpu()) for x, y in StreamPipeline(idx.train, recipe, decode="cpu", **kw).epoch(0)]
    gpu = [(x.cpu(), y.cpu()) for x, y in StreamPipeline(idx.train, recipe, decode="gpu", **kw).epoch(0)]
    assert len(cpu) == len(gpu) == 3
    for (xc, yc), (xg, yg) in zip(cpu, gpu):
        assert torch.equal(yc, yg) and xg.shape == xc.shape
        # out of 255: rounding of the IDCT, the upsampling and the resize, a level or two on smooth images
        assert (xg - xc).abs().mean() < 2, (xg - xc).abs().mean()
        assert (xg - xc).abs().max() <= 12, (xg - xc).abs().max()
    ev = StreamEval(idx.test, recipe, rank=0, world=1, device=cuda, workers=0, decode="gpu")
    ys = torch.cat([y for _, y in ev.batches(kw["normalize"])])
    assert ys.tolist() == idx.test.labels.tolist()


def test_auto_streams_a_folder_over_the_memory_budget(tmp_path, monkeypatch):
    from dist_cnn.data import open as data_open

    root = write_folder(tmp_path / "d")
    cfg = DataConfig(dataset="imagefolder", data_dir=str(root), image_size=16, loader="auto")
    source, why = data_open.open_source(cfg, DistEnv())
    assert source.kind == "memory" and why.startswith("auto: in memory, 19 images at 16 px")
    monkeypatch.setattr(data_open, "available_memory", lambda device: 2 * 19 * 3 * 16 * 16 - 2)  # a byte short
    source, why = data_open.open_source(cfg, DistEnv())
    assert source.kind == "stream" and source.train_size == 12
    assert why.startswith("auto: streamed") and "half the free RAM" in why
    cfg.loader, cfg.dataset = "auto", "synthetic"
    source, why = data_open.open_source(cfg, DistEnv())
    assert source.kind == "memory" and why == ""
