"""dist_cnn.observability.wandb_logger against the real wandb library, offline (no network needed).

Every test points HOME / WANDB_DIR / WANDB_CONFIG_DIR / WANDB_CACHE_DIR / WANDB_DATA_DIR at tmp_path
and clears the W&B environment, so nothing leaks in from the machine or out to it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from dist_cnn.config import LogConfig
from dist_cnn.observability import wandb_logger
from dist_cnn.observability.wandb_logger import WandbLogger, resolve_mode
from tests.support.wandb_records import offline_run_dirs, read_offline_run

wandb = pytest.importorskip("wandb")

CLASSES = ["cat", "dog", "bird"]
FAKE_KEY = "f4ke0123456789abcdef0123456789abcdef4567"  # 40 chars, the shape of a real key
CONFIG = {
    "data": {"dataset": "cifar10"},
    "model": {"name": "resnet18"},
    "train": {"epochs": 2, "lr": 0.1},
    "log": {"wandb": "offline", "wandb_project": "dist_cnn_tests"},
}


@pytest.fixture
def wb_env(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    for var in (
        "WANDB_MODE",
        "WANDB_API_KEY",
        "WANDB_IDENTITY_TOKEN_FILE",
        "WANDB_BASE_URL",
        "NETRC",
        "WANDB_ENTITY",
        "WANDB_PROJECT",
        "WANDB_RUN_ID",
        "WANDB_RESUME",
        "WANDB_NAME",
        "WANDB_TAGS",
        "WANDB_RUN_GROUP",
        "WANDB_NOTES",
        "WANDB_SWEEP_ID",
        "WANDB_DISABLED",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir_env"))  # the logger's dir= must win
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(home / ".config" / "wandb"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(home / ".cache" / "wandb"))
    monkeypatch.setenv("WANDB_DATA_DIR", str(home / ".local" / "share" / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")  # set here so monkeypatch restores it afterwards
    wandb.teardown()  # forget settings a previous test's environment put into wandb's singleton
    yield home
    wandb.teardown()


def _train(step: int, epoch: int) -> dict:
    return {
        "event": "train",
        "epoch": epoch,
        "step": step,
        "loss": 2.5 / step,
        "lr": 0.1 * step / 100,
        "images_per_sec": 4000.0 + step,
        "images_per_sec_per_rank": 1000.0 + step / 4,
        "data_wait_frac": 0.01,
        "epoch_seconds": 1.5,
        "eta_seconds": 30.0,
        "memory_mb": 512.0,
        "time": time.time(),
    }


def _eval(step: int, epoch: int, acc: float) -> dict:
    matrix = [[8, 1, 1], [2, 7, 1], [1, 1, 8]]
    return {
        "event": "eval",
        "epoch": epoch,
        "step": step,
        "test_accuracy": acc,
        "test_correct": 23,
        "test_total": 30,
        "per_class_accuracy": [0.8, 0.7, 0.8],
        "confusion_matrix": matrix,
        "train_seconds": 3.0 * epoch,
        "time": time.time(),
    }


def _run_segment(run_dir: Path, steps, epoch: int, *, run_id=None, mode="offline", final_acc=0.77):
    """One process's worth of logging: init, train records, one eval, finish. Returns (logger, seconds)."""
    t0 = time.perf_counter()
    logger = WandbLogger(
        LogConfig(wandb=mode, wandb_project="dist_cnn_tests", run_name="t"),
        run_dir,
        CONFIG,
        run_id,
        True,
    )
    for s in steps:
        logger.log_train(_train(s, epoch))
    logger.log_eval(_eval(steps[-1], epoch + 1, final_acc), CLASSES)
    run_id = logger.run_id
    logger.finish({"test_accuracy": final_acc, "epochs": epoch + 1, "classes": CLASSES})
    seconds = time.perf_counter() - t0
    print(f"wandb segment ({mode}, {len(steps)} steps): {seconds:.2f} s")
    return logger, run_id, seconds


def test_offline_run_is_read_back(wb_env, tmp_path):
    run_dir = tmp_path / "run"
    steps = [10, 20, 30, 40]
    logger, run_id, _ = _run_segment(run_dir, steps, 0, final_acc=0.7667)
    assert logger.mode == "offline" and run_id
    dirs = offline_run_dirs(run_dir)
    assert len(dirs) == 1 and dirs[0].name.endswith(f"-{run_id}")
    assert not (tmp_path / "wandb_dir_env").exists()  # everything under the run dir

    back = read_offline_run(run_dir)
    assert back["run_id"] == run_id
    train_rows = [r for r in back["history"] if "train/loss" in r]
    assert [r["_step"] for r in train_rows] == steps
    assert [r["train/loss"] for r in train_rows] == pytest.approx([2.5 / s for s in steps])
    assert [r["train/lr"] for r in train_rows] == pytest.approx([0.1 * s / 100 for s in steps])
    assert [r["train/epoch"] for r in train_rows] == [0, 0, 0, 0]
    assert [r["train/images_per_sec"] for r in train_rows] == [4000.0 + s for s in steps]
    eval_row = next(r for r in back["history"] if "test/accuracy" in r)
    assert eval_row["_step"] == 40 and eval_row["test/accuracy"] == pytest.approx(0.7667)
    assert eval_row["test/epoch"] == 1 and eval_row["test/correct"] == 23 and eval_row["train_seconds"] == 3.0
    assert eval_row["test/per_class_accuracy/dog"] == pytest.approx(0.7)
    assert eval_row["test/confusion_matrix_table"]["_type"] == "table-file"
    tables = list(dirs[0].glob("files/media/table/**/*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["Actual", "Predicted", "nPredictions"]
    assert ["cat", "dog", 1] in table["data"] and len(table["data"]) == 9
    assert back["summary"]["test_accuracy"] == pytest.approx(0.7667)
    assert back["summary"]["classes"] == CLASSES
    assert back["config"]["model"] == {"name": "resnet18"} and back["config"]["train"]["lr"] == 0.1
    assert set(back["config"]) == set(CONFIG) | {"_wandb"}  # the run config only


def test_resume_continues_same_run_with_increasing_steps(wb_env, tmp_path):
    run_dir = tmp_path / "run"
    _, run_id, t1 = _run_segment(run_dir, [10, 20, 30], 0, final_acc=0.5)
    # the trainer stores run_id in its checkpoint; the requeued job passes it back
    logger, run_id2, t2 = _run_segment(run_dir, [40, 50, 60], 1, run_id=run_id, final_acc=0.6)
    assert run_id2 == run_id

    back = read_offline_run(run_dir)
    # offline, each wandb.init writes its own offline-run-<time>-<id> dir: two segments, one run id
    assert len(offline_run_dirs(run_dir)) == 2
    assert back["run_ids"] == [run_id, run_id]
    assert [s["resume"] for s in back["segments"]] == [False, True]
    first, second = (s["history"] for s in back["segments"])
    assert max(r["_step"] for r in first) == 30 and min(r["_step"] for r in second) == 40
    steps = [r["_step"] for r in back["history"]]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert back["summary"]["test_accuracy"] == pytest.approx(0.6)  # the later segment wins
    print(f"wandb timings: first {t1:.2f} s, resumed {t2:.2f} s")


def test_disabled_and_other_ranks_write_nothing(wb_env, tmp_path, logged):
    for cfg, enabled in ((LogConfig(wandb="disabled"), True), (LogConfig(wandb="offline"), False)):
        run_dir = tmp_path / f"run-{cfg.wandb}-{enabled}"
        logger = WandbLogger(cfg, run_dir, CONFIG, "abc123", enabled)
        logger.log_train(_train(1, 0))
        logger.log_eval(_eval(1, 1, 0.5), CLASSES)
        logger.finish({"test_accuracy": 0.5})
        assert logger.run_id is None and logger.mode == "disabled" and not logger.active
        assert not run_dir.exists() and logged == []
    assert not (tmp_path / "wandb_dir_env").exists()
    assert list(wb_env.iterdir()) == []  # HOME untouched


def test_auto_without_credentials_goes_offline_with_sync_hint(wb_env, tmp_path):
    mode, message = resolve_mode("auto", tmp_path / "run")
    assert mode == "offline"
    assert "wandb sync" in message and str(tmp_path / "run" / "wandb") in message and "\n" not in message
    assert resolve_mode("offline") == ("offline", None)
    assert resolve_mode("disabled") == ("disabled", None)
    assert list(wb_env.iterdir()) == []  # deciding wrote nothing


def test_auto_honours_wandb_mode_env(wb_env, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_MODE", "offline")
    mode, message = resolve_mode("auto", tmp_path / "run")
    assert mode == "offline" and "wandb sync" in message and FAKE_KEY not in message
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == ("disabled", None)
    logger = WandbLogger(LogConfig(wandb="auto"), tmp_path / "run", CONFIG, None, True)
    assert logger.mode == "disabled" and not (tmp_path / "run").exists()


def test_auto_with_credentials_goes_online(wb_env, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert resolve_mode("auto") == ("online", None)
    monkeypatch.delenv("WANDB_API_KEY")
    (wb_env / ".netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {FAKE_KEY}\n")
    (wb_env / ".netrc").chmod(0o600)
    assert resolve_mode("auto") == ("online", None)
    (wb_env / ".netrc").write_text(f"machine example.com\n  login user\n  password {FAKE_KEY}\n")
    assert resolve_mode("auto")[0] == "offline"


def _assert_no_key(paths, text: str):
    assert FAKE_KEY not in text
    checked = 0
    for root in paths:
        for f in Path(root).rglob("*"):
            if f.is_file() and not f.is_symlink():
                checked += 1
                assert FAKE_KEY.encode() not in f.read_bytes(), f"API key leaked into {f}"
    return checked


def test_api_key_never_written(wb_env, tmp_path, monkeypatch, capfd, logged):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    run_dir = tmp_path / "run"
    logger, run_id, _ = _run_segment(run_dir, [5, 10], 0, mode="offline")
    assert logger.mode == "offline" and run_id
    out = capfd.readouterr()
    checked = _assert_no_key([tmp_path], out.out + out.err + "\n".join(logged))
    assert checked >= 3 and read_offline_run(run_dir)["run_id"] == run_id


def test_online_init_failure_falls_back_to_offline(wb_env, tmp_path, monkeypatch, capfd, logged):
    """Online with no reachable server: one-line warnings, then an offline run; training goes on."""
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens: connection refused
    monkeypatch.setattr(wandb_logger, "INIT_TIMEOUT_S", 3.0)
    run_dir = tmp_path / "run"
    logger, run_id, seconds = _run_segment(run_dir, [1, 2], 0, mode="online")
    assert logger.mode == "offline" and run_id
    assert any("init (online) failed" in m for m in logged)
    assert any("wandb sync" in m for m in logged)
    assert all("\n" not in m for m in logged)
    assert [r["_step"] for r in read_offline_run(run_dir)["history"] if "train/loss" in r] == [1, 2]
    # the failed online attempt and the offline fallback share one id, so a later sync fills that run
    assert {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("*run-*")} == {run_id}
    out = capfd.readouterr()
    _assert_no_key([tmp_path], out.out + out.err + "\n".join(logged))
