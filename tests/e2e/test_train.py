"""End-to-end single-process training through train.py, and what it leaves in the run directory."""

import json

import pytest
import torch

from dist_cnn.config import load_file
from tests.support.common import ROOT, SMALL, read_events, read_summary, train


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
    assert not list(out.glob("*.png"))  # --no-plots (SMALL); the plots' own test asks for them


def test_fractional_epochs_train_their_share_of_an_epoch(tmp_path):
    out = tmp_path / "run"
    p = train([*SMALL, "--epochs", "1.5", "--out", out], check=0)
    s = read_summary(out)
    assert s["steps"] == 48 and s["epochs"] == 1 and s["epochs_trained"] == 1.5  # ceil(1.5 x 32) steps
    assert "epochs: 1.5   steps: 48" in p.stdout
    assert read_events(out, "eval")[-1]["step"] == 48  # the final evaluation is after the last step


def test_config_file_with_flag_override(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[train]\nepochs = 3\nbatch_size = 128\n[data]\ndataset = "synthetic"\n')
    out = tmp_path / "run"
    train(["--config", cfg, *SMALL[2:], "--epochs", "1", "--max-steps", "5", "--out", out], check=0)
    saved = json.loads((out / "config.json").read_text())
    assert saved["train"]["epochs"] == 1  # the flag beats the file
    assert saved["train"]["batch_size"] == 64  # SMALL's flag beats the file's 128
    assert read_summary(out)["steps"] == 5


def test_seed_config_drives_the_run(tmp_path):
    """configs/seed.toml's values reach a real run: the saved config, the batch size, a constant LR, the
    optimizer's settings in the checkpoint, 0.5/0.5 normalization and plain NCHW weights."""
    seed_toml = ROOT / "configs" / "seed.toml"
    out = tmp_path / "run"
    train(
        [
            "--config",
            seed_toml,
            "--dataset",
            "synthetic",
            "--synthetic-train-size",
            "96",
            "--synthetic-test-size",
            "40",
            "--max-steps",
            "12",
            "--log-every",
            "3",
            "--eval-every",
            "0",
            "--wandb",
            "disabled",
            "--no-progress",
            "--out",
            out,
        ],
        check=0,
    )
    saved = json.loads((out / "config.json").read_text())
    overridden = {("data", "dataset"), ("train", "log_every")}  # by the flags above
    file = load_file(str(seed_toml))
    assert file["train"]["batch_size"] == 4 and file["optim"]["schedule"] == "constant"  # what is checked below
    for section, values in file.items():
        for key, value in values.items():
            if (section, key) not in overridden:
                assert saved[section][key] == value, (section, key, saved[section][key], value)

    s = read_summary(out)
    assert (s["global_batch_size"], s["per_rank_batch_size"], s["steps"]) == (4, 4, 12), s
    assert (s["model"], s["precision"]) == ("seed", "fp32"), s
    lr = file["optim"]["lr"]
    assert [(t["step"], t["lr"]) for t in read_events(out, "train")] == [(k, pytest.approx(lr)) for k in (3, 6, 9, 12)]

    state = torch.load(out / "checkpoints" / "step-00000012.pt", weights_only=True)
    groups = state["optimizer"]["param_groups"]
    assert [(g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) for g in groups] == [
        (pytest.approx(lr), file["optim"]["momentum"], False, 0.0)
    ] * 2
    final = torch.load(out / "model.pt", weights_only=True)
    assert final["mean"] == [0.5] * 3 and final["std"] == [0.5] * 3  # normalize = "half"
    convs = [v for v in final["model"].values() if v.ndim == 4]
    assert convs and all(v.is_contiguous() for v in convs)  # channels_last = false (the default is true)


@pytest.mark.slow
def test_grad_accum_matches_plain_batch(tmp_path):
    """Accumulating 2 micro-batches of 32 is the same optimizer step as one batch of 64."""
    outs = []
    for accum in (1, 2):
        out = tmp_path / f"a{accum}"
        train([*SMALL, "--max-steps", "4", "--grad-accum", accum, "--out", out, "--eval-every", "0"], check=0)
        outs.append(torch.load(out / "model.pt", weights_only=True)["model"])
    diff = max((outs[0][k] - outs[1][k]).abs().max().item() for k in outs[0])
    assert diff < 1e-5, diff
