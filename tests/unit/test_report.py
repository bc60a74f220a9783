"""dist_cnn.observability.report: plots and text report from a (fake but realistic) run directory."""

from __future__ import annotations

import json
import random

import pytest

from dist_cnn import config
from dist_cnn.commands.report import main_report as report_command
from dist_cnn.errors import UserError
from dist_cnn.observability.report import format_report, read_metrics, write_plots

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _confusion(rng: random.Random, n: int, per_class: int, acc: float) -> list[list[int]]:
    matrix = []
    for i in range(n):
        row = [0] * n
        for _ in range(per_class):
            j = i if rng.random() < acc else rng.randrange(n)
            row[j] += 1
        matrix.append(row)
    return matrix


def make_run(
    run_dir, *, epochs=3, steps_per_epoch=40, log_every=10, classes=CLASSES, summary=True, truncated_tail=False
):
    """A run directory as the trainer writes it (rank 0): config.json, metrics.jsonl, summary.json."""
    rng = random.Random(0)
    run_dir.mkdir(parents=True, exist_ok=True)
    n = len(classes)
    config = {
        "data": {"dataset": "cifar10"},
        "model": {"name": "resnet18"},
        "train": {"epochs": epochs, "batch_size": 256, "precision": "auto"},
        "log": {"wandb": "offline"},
    }
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    lines, t0, step = [], 1.7e9, 0
    total_steps = epochs * steps_per_epoch
    eval_rec = None
    for epoch in range(epochs):
        for _ in range(steps_per_epoch):
            step += 1
            if step % log_every == 0:
                lines.append(
                    {
                        "event": "train",
                        "epoch": epoch,
                        "step": step,
                        "loss": 2.3 * (1 - step / (total_steps + 10)) + 0.05 * rng.random(),
                        "lr": 0.1 * min(1.0, step / 20) * (1 - step / (total_steps + 1)),
                        "images_per_sec": 8000.0 + rng.random() * 100,
                        "images_per_sec_per_rank": 2000.0,
                        "data_wait_frac": 0.02,
                        "epoch_seconds": 3.1,
                        "eta_seconds": 10.0,
                        "memory_mb": 1234.5,
                        "time": t0 + step * 0.1,
                    }
                )
        acc = 0.4 + 0.15 * epoch
        matrix = _confusion(rng, n, 100, acc)
        correct = sum(matrix[i][i] for i in range(n))
        eval_rec = {
            "event": "eval",
            "epoch": epoch + 1,
            "step": step,
            "test_accuracy": correct / (100 * n),
            "test_correct": correct,
            "test_total": 100 * n,
            "per_class_accuracy": [matrix[i][i] / 100 for i in range(n)],
            "confusion_matrix": matrix,
            "train_seconds": 3.1 * (epoch + 1),
            "time": t0 + step * 0.1,
        }
        lines.append(eval_rec)
        lines.append({"event": "checkpoint", "step": step, "path": f"checkpoints/step{step}.pt"})
    text = "".join(json.dumps(r) + "\n" for r in lines)
    if truncated_tail:
        text += '{"event": "train", "epoch": 3, "step": 999, "lo'  # killed mid-write
    (run_dir / "metrics.jsonl").write_text(text)
    if summary:
        (run_dir / "summary.json").write_text(
            json.dumps(
                {
                    "test_accuracy": eval_rec["test_accuracy"],
                    "test_correct": eval_rec["test_correct"],
                    "test_total": eval_rec["test_total"],
                    "per_class_accuracy": eval_rec["per_class_accuracy"],
                    "classes": list(classes),
                    "epochs": epochs,
                    "steps": step,
                    "world_size": 4,
                    "backend": "nccl",
                    "train_seconds": eval_rec["train_seconds"],
                    "train_images_per_sec": 8050.0,
                    "model": "resnet18",
                    "dataset": "cifar10",
                    "precision": "bf16",
                    "global_batch_size": 256,
                    "per_rank_batch_size": 64,
                },
                indent=2,
            )
        )
    return eval_rec


def _assert_png(path):
    assert path.is_file() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_plots_are_valid_pngs_and_rerender_the_same_set(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    paths = write_plots(run)
    assert sorted(p.name for p in paths) == ["accuracy.png", "confusion_matrix.png", "loss.png"]
    for p in paths:
        assert p.parent == run
        _assert_png(p)
    before = sorted(p.name for p in run.iterdir())
    again = write_plots(run)
    assert sorted(p.name for p in again) == sorted(p.name for p in paths)
    assert sorted(p.name for p in run.iterdir()) == before  # no temp files or extra plots left
    for p in again:
        _assert_png(p)


def test_report_has_accuracy_classes_and_run_facts(tmp_path):
    run = tmp_path / "run"
    last = make_run(run)
    summary = json.loads((run / "summary.json").read_text())
    text = format_report(summary, read_metrics(run))
    assert f"{100 * last['test_accuracy']:.2f}%" in text
    assert f"({last['test_correct']}/{last['test_total']})" in text
    for name in CLASSES:
        assert name in text
    for a in last["per_class_accuracy"]:
        assert f"{100 * a:.2f}%" in text
    assert "world size: 4" in text and "bf16" in text and "resnet18" in text and "cifar10" in text
    assert "8,050 images/s total" in text and "2,012 images/s per rank" in text
    assert "training time" in text


def test_truncated_last_line_is_tolerated(tmp_path, capsys):
    run = tmp_path / "run"
    make_run(run, truncated_tail=True)
    metrics = read_metrics(run)
    assert metrics and all(isinstance(r, dict) for r in metrics)
    assert max(r["step"] for r in metrics if r["event"] == "train") == 120  # the cut record is dropped
    assert report_command([str(run)]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 unreadable line" in out
    assert {p.name for p in run.glob("*.png")} == {"loss.png", "accuracy.png", "confusion_matrix.png"}


def test_killed_run_without_summary_reports_last_eval(tmp_path, capsys):
    run = tmp_path / "run"
    last = make_run(run, summary=False)
    assert report_command([str(run)]) == 0
    out = capsys.readouterr().out
    assert "did not finish" in out
    assert f"{100 * last['test_accuracy']:.2f}%" in out
    assert "resnet18" in out and "cifar10" in out  # from config.json


def test_many_classes_and_no_evals(tmp_path):
    run = tmp_path / "c100"
    make_run(run, epochs=1, classes=[f"class_{i}" for i in range(100)])
    names = {p.name for p in write_plots(run)}
    assert names == {"loss.png", "accuracy.png", "confusion_matrix.png"}
    _assert_png(run / "confusion_matrix.png")

    only_train = tmp_path / "early"
    only_train.mkdir()
    (only_train / "metrics.jsonl").write_text(
        json.dumps(
            {
                "event": "train",
                "epoch": 0,
                "step": 10,
                "loss": 2.0,
                "lr": 0.01,
                "images_per_sec": 1.0,
                "images_per_sec_per_rank": 1.0,
                "data_wait_frac": 0.0,
                "epoch_seconds": 1.0,
                "eta_seconds": 1.0,
                "memory_mb": 0.0,
                "time": 0.0,
            }
        )
        + "\n"
    )
    assert [p.name for p in write_plots(only_train)] == ["loss.png"]
    assert "not evaluated" in format_report({}, read_metrics(only_train))


def test_main_report_prints_report(tmp_path, capsys):
    run = tmp_path / "run"
    make_run(run)
    assert report_command([str(run)]) == 0
    out = capsys.readouterr().out
    assert str(run) in out and "test accuracy" in out and "loss.png" in out


@pytest.mark.parametrize("kind", ["missing", "file", "empty"])
def test_bad_run_dir_is_a_user_error(tmp_path, kind):
    target = tmp_path / "nope"
    if kind == "file":
        target.write_text("x")
    elif kind == "empty":
        target.mkdir()
    with pytest.raises(UserError) as err:
        report_command([str(target)])
    assert "\n" not in str(err.value) and str(target) in str(err.value)


def test_invalid_summary_is_a_user_error(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    (run / "summary.json").write_text("{not json")
    with pytest.raises(UserError, match="summary.json"):
        report_command([str(run)])


@pytest.mark.parametrize("flags,plots", [([], True), (["--no-plots"], False), (["--no-plots", "--plots"], True)])
def test_the_end_of_run_plots_are_on_unless_no_plots(flags, plots):
    assert config.from_args(config.train_parser().parse_args(flags)).log.plots is plots
