"""A checkpoint written by an earlier version (tests/fixtures/README.md) still loads, restores every
component as saved, resumes to the same results the original run computed, and evaluates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dist_cnn import config
from dist_cnn.commands.eval import main_eval
from dist_cnn.distributed import process_group as D
from dist_cnn.inference.predictor import load_model
from dist_cnn.train import checkpoint
from dist_cnn.train.state import OptimizerState
from dist_cnn.train.trainer import Trainer, train
from tests.support.tiny_folder import write_tiny_folder

pytestmark = pytest.mark.filterwarnings("ignore:Unable to enable fault handler")

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
FIXTURE = FIXTURES / "seed-tiny-step-00000006.pt"
EXPECTED = json.loads((FIXTURES / "seed-tiny-expected.json").read_text())


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tiny_folder(tmp_path_factory.mktemp("tiny") / "data")


@pytest.fixture
def ckpt(tmp_path):
    """A copy: eval writes its report beside the checkpoint."""
    return Path(shutil.copy(FIXTURE, tmp_path / FIXTURE.name))


def resume_cfg(ckpt: Path, data: Path, out: Path) -> config.Config:
    argv = ["--resume", str(ckpt), "--data-dir", str(data), "--out", str(out), "--log-every", "1"]
    return config.from_args(config.train_parser().parse_args([*argv, "--wandb", "disabled", "--no-progress"]))


def test_the_fixture_restores_every_component_as_saved(ckpt, data, tmp_path):
    saved = checkpoint.load(ckpt)
    cfg = resume_cfg(ckpt, data, tmp_path / "r")
    with D.process_group(cfg.dist.backend, cfg.dist.timeout, cfg.dist.setup_timeout) as env:
        trainer = Trainer(cfg, env)
        trainer.stop.uninstall()
        trainer.heartbeat.stop()
    assert (trainer.step, trainer.epoch, trainer.epoch_step) == (6, 1, 2)
    for name, tensor in trainer.raw_model.state_dict().items():
        assert torch.equal(tensor, saved["model"][name]), name
    for name, tensor in trainer.ema.state_dict().items():
        assert torch.equal(tensor, saved["ema"][name]), name
    opt = trainer.optimizer.state_dict()

    def hyper(groups):  # the implementation (fused, foreach) is this device's, not the checkpoint's
        return [{k: v for k, v in g.items() if k not in OptimizerState.IMPLEMENTATION} for g in groups]

    assert hyper(opt["param_groups"]) == hyper(saved["optimizer"]["param_groups"])
    for i, s in saved["optimizer"]["state"].items():
        assert torch.equal(opt["state"][i]["momentum_buffer"], s["momentum_buffer"])
    assert trainer.schedule.state_dict() == saved["schedule"]
    assert torch.equal(torch.get_rng_state(), saved["rng"][0]["torch"])
    assert (trainer.best_acc, trainer.skipped_steps, trainer.meter.seconds) == (
        saved["best_acc"],
        saved["skipped_steps"],
        saved["train_seconds"],
    )

    def events(history):  # a checkpoint event's path is gone from a copy elsewhere (pruned: true)
        return [(r["event"], r.get("step"), r.get("loss")) for r in history]

    assert events(trainer.metrics.history[: len(saved["metrics"])]) == events(saved["metrics"])


def test_the_fixture_resumes_to_the_original_runs_results(ckpt, data, tmp_path):
    out = tmp_path / "r"
    summary = train(resume_cfg(ckpt, data, out))
    assert summary["steps"] == 8
    losses = {
        str(r["step"]): r["loss"]
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        if r.get("event") == "train" and r["step"] > 6
    }
    # the next batches are the original run's: another batch moves the loss by about 1e-2
    assert losses == pytest.approx(EXPECTED["losses"], rel=1e-5)
    assert summary["test_accuracy"] == EXPECTED["test_accuracy"]
    assert summary["ema_test_accuracy"] == EXPECTED["ema_test_accuracy"]
    written = checkpoint.load(out / "checkpoints" / "step-00000008.pt")
    old = checkpoint.load(ckpt)
    assert set(written) == set(old) - {"lookahead"}  # the same layout; a run without lookahead has no entry
    assert {k: type(v) for k, v in written.items()} == {k: type(v) for k, v in old.items() if k != "lookahead"}
    final = checkpoint.load(out / "model.pt")
    for key in ("model", "ema"):
        norms = {k: float(v.double().norm()) for k, v in final[key].items()}
        assert norms == pytest.approx(EXPECTED[f"{key}_norms"], rel=1e-5), key


@pytest.mark.parametrize("weights", ["model", "ema"])
def test_eval_reads_the_fixture(ckpt, data, tmp_path, weights):
    report = tmp_path / f"{weights}.json"
    argv = ["--checkpoint", str(ckpt), "--data-dir", str(data), "--weights", weights, "--output", str(report)]
    assert main_eval(argv) == 0
    res = json.loads(report.read_text())
    assert res["test_total"] == 16 and res["weights"] == weights and res["classes"] == ["a", "b", "c", "d"]


def test_predict_and_export_read_the_fixture(ckpt):
    model = load_model(ckpt)
    assert model.classes == ["a", "b", "c", "d"] and model.image_size == 4
    saved = checkpoint.load(ckpt)["model"]
    for name, tensor in model.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
