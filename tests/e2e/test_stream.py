"""`--loader stream` end to end: exact resume, world-size equivalence, exact eval, bad and odd files."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.support.common import NOISE, ROOT, clean_env, read_events, read_summary, run_py, torchrun, train

FAIL = ROOT / "tests/support/fail_rank.py"


def make_folder(root, n_train=48, n_test=20, classes=2, seed=0):
    """Tiny JPEGs of 24-40 px; each class a colour cast, so a few steps learn something."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for i in range(n):
            c = i % classes
            h, w = (int(v) for v in rng.integers(24, 41, 2))
            pix = rng.integers(0, 160, (h, w, 3)) + 90 * np.eye(3, dtype=np.int64)[c % 3]
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pix.clip(0, 255).astype(np.uint8)).save(d / f"{i:04d}.jpg", quality=90)
    return root


def args(root, *extra):
    # 48 images / batch 16 = 3 steps an epoch; 2 epochs; a checkpoint every 2 steps; one worker each.
    return [
        "--dataset",
        "imagefolder",
        "--data-dir",
        root,
        "--loader",
        "stream",
        "--image-size",
        "24",
        "--batch-size",
        "16",
        "--epochs",
        "2",
        "--wandb",
        "disabled",
        "--no-progress",
        "--precision",
        "fp32",
        "--workers",
        "1",
        "--log-every",
        "1",
        "--checkpoint-every-steps",
        "2",
        "--flip",
        *map(str, extra),
    ]


def launcher(nproc):
    return (lambda a, **kw: torchrun(nproc, a, **kw)) if nproc > 1 else train


def history(run_dir):
    return [
        {k: v for k, v in e.items() if k not in NOISE} for e in read_events(run_dir) if e["event"] in ("train", "eval")
    ]


def weights(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)["model"]


def max_diff(a, b):
    wa, wb = weights(a), weights(b)
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("stream") / "imgs")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, folder):
    """straight(nproc): (run directory, process) of the uninterrupted run on `nproc` ranks, trained once
    for the module (the resume tests and the world-size test compare against the same runs)."""
    runs = {}

    def get(nproc):
        if nproc not in runs:
            out = tmp_path_factory.mktemp(f"straight{nproc}") / "run"
            runs[nproc] = out, launcher(nproc)(args(folder, "--out", out), check=0)
        return runs[nproc]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_exact_resume_mid_epoch(tmp_path, folder, straight, nproc):
    run, p = straight(nproc)
    assert "stream pipeline" in p.stdout
    env = clean_env(FAIL_RANK=str(nproc - 1), FAIL_STEP="5")  # epoch 2, step 2 of 3
    cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", FAIL] if nproc > 1 else [FAIL]
    crashed = run_py([*cmd, *args(folder, "--out", tmp_path / "resumed")], env=env)
    assert crashed.returncode != 0 and "injected failure" in crashed.stdout + crashed.stderr
    p = launcher(nproc)(args(folder, "--out", tmp_path / "resumed", "--resume", "auto"), check=0)
    assert "resumed from" in p.stdout and "step-00000004.pt" in p.stdout
    assert max_diff(run, tmp_path / "resumed") <= 1e-6
    assert history(run) == history(tmp_path / "resumed")
    s = read_summary(tmp_path / "resumed")
    assert s["steps"] == 6 and s["loader"] == "stream" and s["skipped_images"] == 0


@pytest.mark.slow
def test_world_size_2_matches_world_size_1(straight):
    # the resume tests' uninterrupted runs: 2 epochs, an epoch boundary and evaluations in between
    assert max_diff(straight(1)[0], straight(2)[0]) <= 1e-5


@pytest.mark.slow
def test_exact_eval_world_size_3_on_499_images(tmp_path):
    root = make_folder(tmp_path / "imgs", n_train=48, n_test=499, classes=3)
    out = tmp_path / "ws3"
    torchrun(3, args(root, "--batch-size", "15", "--max-steps", "2", "--out", out), check=0)
    s = read_summary(out)
    assert s["world_size"] == 3 and s["test_total"] == 499  # 499 = 3 * 166 + 1
    run_py(["-m", "dist_cnn.cli", "eval", "--checkpoint", out / "model.pt", "--output", tmp_path / "e.json"], check=0)
    single = json.loads((tmp_path / "e.json").read_text())
    assert single["world_size"] == 1 and single["test_total"] == 499
    assert single["test_correct"] == s["test_correct"] and single["per_class_accuracy"] == s["per_class_accuracy"]


@pytest.mark.slow
def test_unreadable_files_stop_with_one_line_or_are_skipped_and_counted(tmp_path):
    root = make_folder(tmp_path / "imgs")
    (root / "train" / "c0" / "0000.jpg").write_bytes(b"")
    good = (root / "train" / "c1" / "0001.jpg").read_bytes()
    (root / "train" / "c1" / "0003.jpg").write_bytes(good[: len(good) // 2])
    (root / "train" / "c0" / "0004.jpg").write_text("not an image")
    (root / "test" / "c1" / "0001.jpg").write_bytes(b"")
    p = train(args(root, "--out", tmp_path / "stop", "--epochs", "1"))
    assert p.returncode == 2, p.stderr
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in p.stderr, p.stderr
    assert any(name in err[0] for name in ("c0/0000.jpg", "c1/0003.jpg", "c0/0004.jpg", "c1/0001.jpg")), err

    p = train(args(root, "--out", tmp_path / "skip", "--skip-bad-images"), check=0)
    s = read_summary(tmp_path / "skip")
    assert s["skipped_images"] == 4 and s["test_total"] == 19, s  # 3 training files replaced, 1 test file left out
    assert "unreadable" in p.stdout and "c0/0000.jpg" in p.stdout
    assert read_events(tmp_path / "skip", "eval")[-1]["skipped_images"] == 4


def test_grayscale_rgba_cmyk_palette_mix(tmp_path):
    root = make_folder(tmp_path / "imgs", n_train=32, n_test=8)
    rgb = np.random.default_rng(2).integers(0, 256, (30, 26, 3), dtype=np.uint8)
    for i, (mode, ext) in enumerate(
        [("L", "jpg"), ("RGBA", "png"), ("CMYK", "jpg"), ("P", "png"), ("P", "gif"), ("LA", "png"), ("RGB", "bmp")]
    ):
        for split in ("train", "test"):
            Image.fromarray(rgb).convert(mode).save(root / split / f"c{i % 2}" / f"odd{i}.{ext}")
    train(args(root, "--out", tmp_path / "run", "--epochs", "1"), check=0)
    s = read_summary(tmp_path / "run")
    assert s["test_total"] == 15 and s["skipped_images"] == 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False here")
def test_decode_gpu_run(tmp_path, folder):
    """--decode gpu end to end: nvjpeg decodes, the run trains, evaluates and resumes like the CPU path."""
    train(args(folder, "--out", tmp_path / "gpu", "--decode", "gpu"), check=0)
    s = read_summary(tmp_path / "gpu")
    assert s["loader"] == "stream" and s["device"].startswith("cuda") and s["test_total"] == 20, s


def test_decode_gpu_on_the_cpu_is_one_line(tmp_path, folder):
    if torch.cuda.is_available():
        pytest.skip("the CPU's refusal")
    p = train(args(folder, "--out", tmp_path / "run", "--decode", "gpu"))
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "--decode gpu" in p.stderr, p.stderr
