"""Any model, starting weights, the Python API and the recipe options, through the real entry points."""
import json
import textwrap

import pytest
import torch
from PIL import Image

from tests.support.common import ROOT, SMALL, clean_env, read_events, read_summary, run_py, torchrun, train

FAIL = ROOT / "tests/support/fail_rank.py"
FAST = [*SMALL, "--max-steps", "4", "--eval-every", "0"]


def assert_one_line_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    for n in needles:
        assert n in p.stderr, (n, p.stderr)


@pytest.fixture
def user_dir(tmp_path):
    """A folder holding the user's own model package; runs start there (the current directory)."""
    pkg = tmp_path / "mynets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent("""
        import torch.nn as nn

        def build(in_channels, num_classes, image_size):
            return nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                 nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * (image_size // 2) ** 2, num_classes))

        def not_a_model(num_classes):
            return [num_classes]
        """))
    return tmp_path


def evaluate_model_pt(run_dir, cwd=ROOT):
    p = run_py(["-m", "dist_cnn.cli", "eval", "--checkpoint", run_dir / "model.pt", "--output", run_dir / "e.json"],
               cwd=cwd, check=0)
    return json.loads((run_dir / "e.json").read_text()), p


def test_torchvision_model_trains_on_2_ranks_and_eval_rebuilds_it(tmp_path):
    out = tmp_path / "run"
    p = torchrun(2, [*FAST, "--model", "torchvision:mobilenet_v3_small", "--out", out], check=0)
    s = read_summary(out)
    assert s["world_size"] == 2 and s["model"] == "torchvision:mobilenet_v3_small" and s["steps"] == 4
    assert s["parameters"] == 1_528_106  # torchvision's network with a 10-class head
    assert "torchvision:mobilenet_v3_small on synthetic" in p.stdout
    ev, _ = evaluate_model_pt(out)
    assert ev["test_accuracy"] == s["test_accuracy"] and ev["model"] == "torchvision:mobilenet_v3_small"


def test_user_module_model_trains_on_2_ranks_and_eval_rebuilds_it(user_dir):
    out = user_dir / "run"
    torchrun(2, [*FAST, "--model", "mynets.nets:build", "--out", out], cwd=user_dir, check=0)
    s = read_summary(out)
    assert s["world_size"] == 2 and s["model"] == "mynets.nets:build"
    assert s["parameters"] == 16 * 3 * 9 + 16 + 32 + 16 * 16 * 16 * 10 + 10
    ev, _ = evaluate_model_pt(out, cwd=user_dir)  # the module is found from the current directory again
    assert ev["test_correct"] == s["test_correct"]


def test_init_from_replaces_the_head(tmp_path):
    folder = tmp_path / "three"
    for split in ("train", "test"):
        for c in range(3):
            (folder / split / f"c{c}").mkdir(parents=True)
            for i in range(8):
                Image.new("RGB", (32, 32), (80 * c, 10 * i, 0)).save(folder / split / f"c{c}" / f"{i}.png")
    first = tmp_path / "three-classes"
    train([*SMALL, "--dataset", "imagefolder", "--data-dir", folder, "--batch-size", "8", "--max-steps", "2",
           "--out", first], check=0)
    old = torch.load(first / "model.pt", weights_only=True)["model"]
    second = tmp_path / "ten-classes"
    p = train([*FAST, "--init-from", first / "model.pt", "--out", second], check=0)
    assert f"--init-from {first / 'model.pt'}: classifier head fc3 re-initialized for 10 classes " \
           f"(the weights have 3)" in p.stdout
    cfg = json.loads((second / "config.json").read_text())
    assert cfg["model"]["init_from"] == str(first / "model.pt")
    (first / "model.pt").unlink()  # a missing file: one line
    p = train([*FAST, "--init-from", first / "model.pt", "--out", tmp_path / "gone"])
    assert_one_line_error(p, "checkpoint not found")
    assert old["fc3.weight"].shape == (3, 84)


@pytest.mark.parametrize("spec,needle", [
    ("nosuchpkg.mod:build", "no module 'nosuchpkg'"),
    ("mynets.nets:missing", "module mynets.nets has no attribute 'missing'"),
    ("torchvision:resnet5", "torchvision has no classification model 'resnet5'"),
    ("vgg", "unknown model 'vgg'"),
])
def test_bad_specs_fail_before_the_data_is_read(user_dir, spec, needle):
    # the data dir does not exist: an error about the model shows the model was checked first
    p = train([*SMALL, "--dataset", "cifar10", "--data-dir", user_dir / "none", "--no-download",
               "--model", spec, "--out", user_dir / "r"], cwd=user_dir)
    assert_one_line_error(p, needle)


def test_factory_returning_something_else_is_one_line(user_dir):
    p = train([*FAST, "--model", "mynets.nets:not_a_model", "--out", user_dir / "r"], cwd=user_dir)
    assert_one_line_error(p, "returned a list, not a torch.nn.Module")


def test_pretrained_offline_says_where_the_file_goes(tmp_path):
    env = clean_env(TORCH_HOME=str(tmp_path / "torch"))
    p = train([*FAST, "--model", "torchvision:resnet18", "--pretrained", "--out", tmp_path / "r"], env=env)
    assert_one_line_error(p, str(tmp_path / "torch" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"),
                          "https://download.pytorch.org/models/resnet18-f37072fd.pth")


def test_api_example_under_torchrun(tmp_path):
    out = tmp_path / "api"
    p = run_py(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                ROOT / "examples" / "custom_model.py", out], check=0)
    s = read_summary(out)
    assert s["world_size"] == 2 and s["model"] == "python:__main__.SmallNet" and s["dataset"] == "python"
    assert s["test_total"] == 128 and s["steps"] == 2 * 512 // 64
    assert p.stdout.count("test accuracy") >= 1 and "on 2 process(es)" in p.stdout
    assert (out / "checkpoints").is_dir() and (out / "model.pt").exists()


RECIPE = [*SMALL, "--synthetic-train-size", "1024", "--epochs", "2", "--checkpoint-every-steps", "5",
          "--log-every", "4", "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0", "--auto-augment", "ta_wide",
          "--random-erase", "0.25", "--clip-grad-norm", "1.0", "--model-ema", "--model-ema-steps", "2",
          "--flip", "--crop-padding", "2"]
NOISE = {"time", "images_per_sec", "images_per_sec_per_rank", "data_wait_frac", "epoch_seconds",
         "eta_seconds", "memory_mb", "train_seconds", "path", "from"}


def _history(run_dir):
    return [{k: v for k, v in e.items() if k not in NOISE} for e in read_events(run_dir)
            if e["event"] in ("train", "eval")]


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
        run_py(["-m", "dist_cnn.cli", "eval", "--checkpoint", tmp_path / "resumed" / "model.pt", "--weights", "ema",
                "--output", tmp_path / "ema.json"], check=0)
        ema = json.loads((tmp_path / "ema.json").read_text())
        assert ema["weights"] == "ema" and ema["test_correct"] == evals[-1]["ema_test_correct"]
