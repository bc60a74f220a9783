"""End-to-end single-process training through train.py, and what it leaves in the run directory."""
import json

from tests.support.common import SMALL, read_events, read_summary, train


def test_synthetic_run_learns_and_writes_run_dir(tmp_path):
    out = tmp_path / "run"
    p = train([*SMALL, "--epochs", "2", "--out", out, "--log-every", "10"], check=0)
    s = read_summary(out)
    assert s["test_accuracy"] > 0.5, s  # 10 classes: chance is 0.1
    assert s["test_total"] == 500 and s["test_correct"] == round(s["test_accuracy"] * 500)
    assert len(s["per_class_accuracy"]) == 10 and s["epochs"] == 2 and s["world_size"] == 1
    assert s["steps"] == 2 * (2048 // 64) and s["model"] == "seed" and s["dataset"] == "synthetic"
    assert s["precision"] == "fp32" and s["train_seconds"] > 0 and s["train_images_per_sec"] > 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["epochs"] == 2 and cfg["data"]["dataset"] == "synthetic"
    trains, evals = read_events(out, "train"), read_events(out, "eval")
    assert [e["epoch"] for e in evals] == [1, 2]
    assert evals[-1]["test_accuracy"] == s["test_accuracy"]
    assert evals[0]["train_seconds"] < evals[1]["train_seconds"] <= s["train_seconds"] + 1e-9
    assert [t["step"] for t in trains] == list(range(10, 64, 10)) + [64]
    assert all({"loss", "lr", "images_per_sec"} <= t.keys() for t in trains)
    assert trains[-1]["loss"] < trains[0]["loss"]
    assert (out / "model.pt").exists() and "test accuracy" in p.stdout


def test_config_file_with_flag_override(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[train]\nepochs = 3\nbatch_size = 128\n[data]\ndataset = "synthetic"\n')
    out = tmp_path / "run"
    train(["--config", cfg, *SMALL[2:], "--epochs", "1", "--max-steps", "5", "--out", out], check=0)
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["epochs"] == 1  # the flag beats the file
    assert saved["train"]["batch_size"] == 64  # SMALL's flag beats the file's 128
    assert read_summary(out)["steps"] == 5


def test_seed_config_is_the_tutorial_recipe():
    from dist_cnn.config import Config, apply_dict, load_file
    from tests.support.common import ROOT
    cfg = Config()
    apply_dict(cfg, load_file(str(ROOT / "configs" / "seed.toml")))
    assert (cfg.model.name, cfg.train.batch_size, cfg.train.epochs) == ("seed", 4, 2)
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.nesterov, cfg.optim.weight_decay) == (0.001, 0.9, False, 0.0)
    assert cfg.optim.schedule == "constant" and cfg.data.normalize == "half"
    assert cfg.data.crop_padding == 0 and not cfg.data.flip and cfg.optim.label_smoothing == 0
    assert cfg.train.precision == "fp32"


def test_grad_accum_matches_plain_batch(tmp_path):
    """Accumulating 2 micro-batches of 32 is the same optimizer step as one batch of 64."""
    import torch
    outs = []
    for accum in (1, 2):
        out = tmp_path / f"a{accum}"
        train([*SMALL, "--max-steps", "4", "--grad-accum", accum, "--out", out, "--eval-every", "0"], check=0)
        outs.append(torch.load(out / "model.pt", weights_only=True)["model"])
    diff = max((outs[0][k] - outs[1][k]).abs().max().item() for k in outs[0])
    assert diff < 1e-5, diff
