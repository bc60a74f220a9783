"""Any model, starting weights, the Python API and the recipe options, through the real entry points."""

import json
import textwrap

import pytest
import torch
from PIL import Image

from tests.support.common import (
    NOISE,
    ROOT,
    SMALL,
    assert_one_line_error,
    clean_env,
    read_events,
    read_summary,
    run_py,
    torchrun,
    train,
)

FAIL = ROOT / "tests/support/fail_rank.py"
FAST = [*SMALL, "--max-steps", "4", "--eval-every", "0"]


@pytest.fixture
def user_dir(tmp_path):
    """A folder holding the user's own model package; runs start there (the current directory)."""
    pkg = tmp_path / "mynets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(
        textwrap.dedent("""
        import torch.nn as nn

        def build(in_channels, num_classes, image_size):
            return nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * (image_size // 2) ** 2, num_classes))

        def not_a_model(num_classes):
            return [num_classes]
        """)
    )
    return tmp_path


def evaluate_model_pt(run_dir, cwd=ROOT, model=None):
    args = ["-m", "dist_cnn.cli", "eval", "--checkpoint", run_dir / "model.pt", "--output", run_dir / "e.json"]
    args += ["--model", model] if model else []  # a user module is imported only when named again
    p = run_py(args, cwd=cwd, check=0)
    return json.loads((run_dir / "e.json").read_text()), p


@pytest.mark.slow
def test_torchvision_model_trains_on_2_ranks_and_eval_rebuilds_it(tmp_path):
    out = tmp_path / "run"
    p = torchrun(2, [*FAST, "--model", "torchvision:mobilenet_v3_small", "--out", out], check=0)
    s = read_summary(out)
    assert s["world_size"] == 2 and s["model"] == "torchvision:mobilenet_v3_small" and s["steps"] == 4
    assert s["parameters"] == 1_528_106  # torchvision's network with a 10-class head
    assert "torchvision:mobilenet_v3_small on synthetic" in p.stdout
    ev, _ = evaluate_model_pt(out)
    assert ev["test_accuracy"] == s["test_accuracy"] and ev["model"] == "torchvision:mobilenet_v3_small"


@pytest.mark.slow
def test_user_module_model_trains_on_2_ranks_and_eval_rebuilds_it(user_dir):
    out = user_dir / "run"
    torchrun(2, [*FAST, "--model", "mynets.nets:build", "--out", out], cwd=user_dir, check=0)
    s = read_summary(out)
    assert s["world_size"] == 2 and s["model"] == "mynets.nets:build"
    assert s["parameters"] == 16 * 3 * 9 + 16 + 32 + 16 * 16 * 16 * 10 + 10
    ev, _ = evaluate_model_pt(out, cwd=user_dir, model="mynets.nets:build")  # found from the current directory again
    assert ev["test_correct"] == s["test_correct"]


@pytest.mark.slow
def test_init_from_replaces_the_head(tmp_path):
    folder = tmp_path / "three"
    for split in ("train", "test"):
        for c in range(3):
            (folder / split / f"c{c}").mkdir(parents=True)
            for i in range(8):
                Image.new("RGB", (32, 32), (80 * c, 10 * i, 0)).save(folder / split / f"c{c}" / f"{i}.png")
    first = tmp_path / "three-classes"
    args = [*SMALL, *"--dataset imagefolder --batch-size 8 --max-steps 2".split()]
    train([*args, "--data-dir", folder, "--out", first], check=0)
    old = torch.load(first / "model.pt", weights_only=True)["model"]
    second = tmp_path / "ten-classes"
    p = train([*FAST, "--init-from", first / "model.pt", "--out", second], check=0)
    head = "classifier head fc3 re-initialized for 10 classes (the weights have 3)"
    assert f"--init-from {first / 'model.pt'}: {head}" in p.stdout
    cfg = json.loads((second / "config.json").read_text())
    assert cfg["model"]["init_from"] == str(first / "model.pt")
    (first / "model.pt").unlink()  # a missing file: one line
    p = train([*FAST, "--init-from", first / "model.pt", "--out", tmp_path / "gone"])
    assert_one_line_error(p, "checkpoint not found")
    assert old["fc3.weight"].shape == (3, 84)


def test_a_bad_spec_fails_before_the_data_is_read(user_dir):
    # Every kind of bad spec is checked in-process (tests/unit/test_cli_bad_input.py); this is the real
    # process, which finds the user's module from its current directory.
    # The data dir does not exist: an error about the model shows the model was checked first.
    args = [*SMALL, "--dataset", "cifar10", "--data-dir", user_dir / "none", "--no-download"]
    p = train([*args, "--model", "mynets.nets:missing", "--out", user_dir / "r"], cwd=user_dir)
    assert_one_line_error(p, "module mynets.nets has no attribute 'missing'")


def test_pretrained_offline_says_where_the_file_goes(tmp_path):
    env = clean_env(TORCH_HOME=str(tmp_path / "torch"))
    p = train([*FAST, "--model", "torchvision:resnet18", "--pretrained", "--out", tmp_path / "r"], env=env)
    where = tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert_one_line_error(p, str(where), "https://download.pytorch.org/models/resnet18-f37072fd.pth")


@pytest.mark.slow
def test_api_example_under_torchrun(tmp_path):
    out = tmp_path / "api"
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    p = run_py([*launch, ROOT / "examples" / "custom_model.py", out], check=0)
    s = read_summary(out)
    assert s["world_size"] == 2 and s["model"] == "python:__main__.SmallNet" and s["dataset"] == "python"
    assert s["test_total"] == 128 and s["steps"] == 2 * 512 // 64
    assert p.stdout.count("test accuracy") >= 1 and "on 2 process(es)" in p.stdout
    assert (out / "checkpoints").is_dir() and (out / "model.pt").exists()


# 1024 images / batch 64 = 16 steps an epoch, 2 epochs, a checkpoint every 5 steps; every recipe option on
RECIPE = [
    *SMALL,
    *"--synthetic-train-size 1024 --epochs 2 --checkpoint-every-steps 5 --log-every 4 --flip --crop-padding 2".split(),
    *"--mixup-alpha 0.2 --cutmix-alpha 1.0 --auto-augment ta_wide --random-erase 0.25 --clip-grad-norm 1.0".split(),
    *"--model-ema --model-ema-steps 2".split(),
]


def _history(run_dir):
    events = [e for e in read_events(run_dir) if e["event"] in ("train", "eval")]
    return [{k: v for k, v in e.items() if k not in NOISE} for e in events]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_recipe_options_resume_exactly(tmp_path, nproc):
    launch = (lambda a, **kw: torchrun(nproc, a, **kw)) if nproc > 1 else train
    launch([*RECIPE, "--out", tmp_path / "straight"], check=0)
    cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", FAIL] if nproc > 1 else [FAIL]
    env = clean_env(FAIL_RANK=str(nproc - 1), FAIL_STEP="27")  # epoch 2, step 11 of 16
    p = run_py([*cmd, *RECIPE, "--out", tmp_path / "resumed"], env=env)
    assert p.returncode != 0 and "injected failure" in p.stdout + p.stderr
    p = launch([*RECIPE, "--out", tmp_path / "resumed", "--resume", "auto"], check=0)
    assert "step-00000025.pt" in p.stdout
    a, b = (torch.load(tmp_path / d / "model.pt", weights_only=True) for d in ("straight", "resumed"))
    for key in ("model", "ema"):
        assert max((a[key][k].float() - b[key][k].float()).abs().max().item() for k in a[key]) <= 1e-6, key
    assert _history(tmp_path / "straight") == _history(tmp_path / "resumed")
    evals = read_events(tmp_path / "resumed", "eval")
    assert all({"ema_test_accuracy", "best_weights"} <= e.keys() for e in evals)
    best = torch.load(tmp_path / "resumed" / "checkpoints" / "best.pt", weights_only=True)
    assert best["best_weights"] in ("model", "ema") and best["ema"]
    if nproc == 1:  # `dist-cnn eval --weights ema` scores the average, as training did
        ema_json = tmp_path / "ema.json"
        args = ["--checkpoint", tmp_path / "resumed" / "model.pt", "--weights", "ema", "--output", ema_json]
        run_py(["-m", "dist_cnn.cli", "eval", *args], check=0)
        ema = json.loads(ema_json.read_text())
        assert ema["weights"] == "ema" and ema["test_correct"] == evals[-1]["ema_test_correct"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: torch.cuda.is_available() is False here")
def test_torchvision_model_with_the_recipe_on_cuda_fp16(tmp_path):
    """The recipe's CUDA paths: per-image transforms on the CPU and back, MixUp/CutMix on the device, clipping
    of fp16-unscaled gradients, the EMA on the device (tools/gpu_check.sh runs the `cuda` tests)."""
    out = tmp_path / "run"
    train([*RECIPE, "--model", "torchvision:resnet18", "--precision", "fp16", "--out", out], check=0)
    s = read_summary(out)
    assert s["precision"] == "fp16" and s["device"].startswith("cuda") and s["steps"] == 32, s
    assert s["skipped_steps"] == 0 and 0 <= s["ema_test_accuracy"] <= 1 and s["best_weights"] in ("model", "ema")
    assert all(t["loss"] == t["loss"] for t in read_events(out, "train"))  # finite (NaN != NaN)
