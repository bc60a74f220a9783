"""Observability end to end: the real train.py (one process and torchrun), the real wandb (offline),
the run directory's metrics.jsonl / summary.json / plots and `dist-cnn report`.

Every subprocess gets HOME, WANDB_DIR, WANDB_CONFIG_DIR, WANDB_CACHE_DIR and WANDB_DATA_DIR in tmp
dirs (and no WANDB_* / NETRC from the machine), so nothing leaks in from the real home or out to it.
W&B runs are read back from disk with tests/support/wandb_records.py (the .wandb file `wandb sync` uploads).
"""

from __future__ import annotations

import base64
import json
import re

import pytest

from tests.support.common import ROOT, SMALL, clean_env, read_events, read_summary, run_py, torchrun, train
from tests.support.wandb_records import offline_run_dirs, read_offline_run

pytest.importorskip("wandb")

FAIL = ROOT / "tests/support/fail_rank.py"
LOG_EVERY = 2
# 512 images / batch 64 = 8 steps an epoch, 2 epochs = 16 steps; a train event every 2 steps.
ARGS = [
    *SMALL,
    "--synthetic-train-size",
    "512",
    "--synthetic-test-size",
    "500",
    "--epochs",
    "2",
    "--log-every",
    str(LOG_EVERY),
    "--plots",
]
TOTAL_STEPS = 16
FAKE_KEY = "f4ke0123456789abcdef0123456789abcdef4567"  # 40 chars, the shape of a real W&B key
PLOTS = ("loss.png", "accuracy.png", "confusion_matrix.png", "rank_times.png")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# a plain (no tty) progress line, e.g. "epoch 1 step 2/16 loss 2.2993 lr 0.05 2769 img/s (1385/rank) ETA 0:00"
PROGRESS_LINE = re.compile(
    r"^epoch (\d+) step (\d+)/(\d+) loss [0-9.]+ lr \S+ (\d+) img/s \((\d+)/rank\) "
    r"ETA (\d+:)?\d+:\d\d$",
    re.M,
)


@pytest.fixture(scope="module")
def mpl_dir(tmp_path_factory):
    """One matplotlib cache for the module: its font cache is built once, not in every fresh HOME."""
    return tmp_path_factory.mktemp("mplconfig")


def wb_env(base, mpl_dir, **extra) -> dict:
    """A subprocess environment whose home and W&B dirs all lie under `base` (created empty here;
    only HOME exists beforehand, so a W&B dir that appears was written by the run)."""
    home = base / "home"
    home.mkdir(parents=True)
    env = clean_env(
        HOME=str(home),
        WANDB_DIR=str(base / "wandb_dir"),
        WANDB_CONFIG_DIR=str(base / "wandb_config"),
        WANDB_CACHE_DIR=str(base / "wandb_cache"),
        WANDB_DATA_DIR=str(base / "wandb_data"),
        MPLCONFIGDIR=str(mpl_dir),
        **extra,
    )
    env.pop("NETRC", None)
    return env


def train_steps(run_dir) -> dict[int, dict]:
    return {e["step"]: e for e in read_events(run_dir, "train")}


def wandb_core_parents(cache_dir) -> set[int]:
    """The pids that started a wandb-core, from its debug logs (one JSON object a line)."""
    logs = list(cache_dir.rglob("core-debug-*.log"))
    assert logs, f"no wandb-core debug log under {cache_dir}: has this wandb moved it?"
    pids = set()
    for log in logs:
        for line in log.read_text().splitlines():
            record = json.loads(line) if line.startswith("{") else {}
            if record.get("msg", "").endswith("starting server"):  # "main: starting server"
                pids.add(record["pid"])
    return pids


def debug_log_pid(offline_run_dir) -> int:
    """The pid of the process that ran wandb.init, from the run's logs/debug.log ("MainThread:<pid>")."""
    m = re.search(r"MainThread:(\d+) ", (offline_run_dir / "logs" / "debug.log").read_text())
    assert m, f"no pid in {offline_run_dir / 'logs' / 'debug.log'}"
    return int(m.group(1))


def history_by_step(rows, key="train/loss") -> dict[int, float]:
    return {r["_step"]: r[key] for r in rows if key in r}


# --------------------------------------------------------------------------- one 2-rank offline run


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, mpl_dir):
    """torchrun --nproc_per_node=2 train.py --wandb offline: (run_dir, base dir, process)."""
    base = tmp_path_factory.mktemp("ddp")
    run_dir = base / "run"
    p = torchrun(2, [*ARGS, "--wandb", "offline", "--out", run_dir], env=wb_env(base, mpl_dir), check=0)
    return run_dir, base, p


@pytest.mark.slow
def test_two_ranks_make_one_offline_run_matching_the_run_files(ddp_run):
    run_dir, base, p = ddp_run
    summary, train = read_summary(run_dir), train_steps(run_dir)
    assert summary["world_size"] == 2 and summary["steps"] == TOTAL_STEPS

    # exactly one W&B run, written by rank 0 under the run directory; nothing from rank 1
    dirs = offline_run_dirs(run_dir)
    assert len(dirs) == 1, dirs
    assert [d.name for d in (run_dir / "wandb").glob("*run-*") if d.is_dir()] == [dirs[0].name]
    assert not (base / "wandb_dir").exists()  # WANDB_DIR unused: the logger passes dir=<run dir>
    # each process that starts wandb starts its own wandb-core, which logs "starting server" with the pid
    # of the process that started it (in WANDB_CACHE_DIR/wandb/logs/core-debug-*.log): exactly one,
    # rank 0, the process that wrote the offline run's debug.log
    assert wandb_core_parents(base / "wandb_cache") == {debug_log_pid(dirs[0])}
    assert "[rank 1]" not in p.stdout + p.stderr and "wandb" not in p.stdout

    back = read_offline_run(run_dir)
    assert back["run_ids"] == [back["run_id"]] and dirs[0].name.endswith("-" + back["run_id"])
    assert back["config"]["log"]["wandb"] == "offline" and back["config"]["train"]["epochs"] == 2

    # per logged step: the train event's numbers, at the same global step, equal to metrics.jsonl
    rows = {r["_step"]: r for r in back["history"] if "train/loss" in r}
    assert sorted(rows) == sorted(train) == list(range(LOG_EVERY, TOTAL_STEPS + 1, LOG_EVERY))
    for step, event in train.items():
        for key in (
            "loss",
            "lr",
            "images_per_sec",
            "images_per_sec_per_rank",
            "data_wait_frac",
            "memory_mb",
            "epoch_seconds",
            "eta_seconds",
            "epoch",
        ):
            assert rows[step][f"train/{key}"] == pytest.approx(event[key], rel=1e-12, abs=1e-12), (step, key)
        for part in ("data_wait", "forward_backward", "comm_wait", "optimizer", "step"):  # every rank's time
            for r in (0, 1):
                assert rows[step][f"rank/{r}/{part}_ms"] == pytest.approx(event[f"rank_{part}_ms"][r]), (step, part)

    # per epoch: test accuracy, per-class accuracy and the confusion matrix (a wandb table)
    evals = read_events(run_dir, "eval")
    assert [e["epoch"] for e in evals] == [1, 2]
    eval_rows = [r for r in back["history"] if "test/accuracy" in r]
    assert [r["_step"] for r in eval_rows] == [e["step"] for e in evals]
    for row, ev in zip(eval_rows, evals):
        assert row["test/accuracy"] == pytest.approx(ev["test_accuracy"])
        assert row["test/epoch"] == ev["epoch"] and row["test/correct"] == ev["test_correct"]
        for name, acc in zip(summary["classes"], ev["per_class_accuracy"]):
            assert row[f"test/per_class_accuracy/{name}"] == pytest.approx(acc)
        table_ref = row["test/confusion_matrix_table"]
        assert table_ref["_type"] == "table-file"
        table = json.loads((dirs[0] / "files" / table_ref["path"]).read_text())
        assert table["columns"] == ["Actual", "Predicted", "nPredictions"]
        names = summary["classes"]
        matrix = [[0] * len(names) for _ in names]
        for actual, predicted, n in table["data"]:
            matrix[names.index(actual)][names.index(predicted)] = n
        assert matrix == ev["confusion_matrix"]

    # at the end: summary.json's values as the run summary
    assert back["summary"]["test_accuracy"] == summary["test_accuracy"]
    for key, value in summary.items():
        want = pytest.approx(value) if isinstance(value, float) else value
        assert back["summary"].get(key) == want, key


def test_throughput_and_eta_in_log_lines_and_metrics(ddp_run):
    run_dir, _, p = ddp_run
    train = read_events(run_dir, "train")
    for e in train:
        assert e["images_per_sec"] > 0 and e["images_per_sec_per_rank"] == pytest.approx(e["images_per_sec"] / 2)
        assert e["epoch_seconds"] > 0 and e["eta_seconds"] >= 0
        assert 0.0 <= e["data_wait_frac"] <= 1.0 and e["memory_mb"] > 0
    assert train[-1]["step"] == TOTAL_STEPS and train[-1]["eta_seconds"] == 0
    # plain lines (no tty) come at most every 10 s, but the first logged step is always printed
    lines = PROGRESS_LINE.findall(p.stdout)
    assert lines, p.stdout
    epoch, step, total, ips, per_rank, _ = lines[0]
    assert (int(epoch), int(step), int(total)) == (1, LOG_EVERY, TOTAL_STEPS)
    first = train[0]
    assert int(ips) == round(first["images_per_sec"]) and int(per_rank) == round(first["images_per_sec_per_rank"])


def test_plots_and_report_command_rerender_them(ddp_run):
    run_dir, _, _ = ddp_run
    from PIL import Image

    def check_pngs():
        for name in PLOTS:
            path = run_dir / name
            assert path.is_file() and path.read_bytes()[:8] == PNG_SIGNATURE, name
            with Image.open(path) as im:
                im.verify()
            with Image.open(path) as im:
                assert im.format == "PNG" and min(im.size) >= 200, (name, im.size)

    check_pngs()  # written by the trainer at the end of the run
    for name in PLOTS:
        (run_dir / name).unlink()
    p = run_py(["-m", "dist_cnn.cli", "report", run_dir], check=0)
    check_pngs()
    summary = read_summary(run_dir)
    assert f"test accuracy: {100 * summary['test_accuracy']:.2f}%" in p.stdout
    assert f"({summary['test_correct']}/{summary['test_total']})" in p.stdout
    for name in summary["classes"]:
        assert re.search(rf"^{re.escape(name)}\s+\d+\.\d\d%", p.stdout, re.M), name
    assert "world size: 2" in p.stdout and "images/s per rank" in p.stdout
    assert sorted(p.name for p in run_dir.glob("*.png")) == sorted(PLOTS)
    assert not list(run_dir.glob("*.tmp"))


# --------------------------------------------------------------------------- crash, then resume


@pytest.mark.slow
def test_resumed_run_continues_the_same_wandb_run(tmp_path, mpl_dir):
    """A crash loses the steps after the last checkpoint; `--resume auto` trains them again and logs
    them again, into the same W&B run (same id, a second offline segment with resume set).

    What holds, and is checked: the resumed segment starts after the checkpoint step (its first step
    is the first logged step after it) and its steps increase; the crashed segment ends at or before
    the crash step; the steps in both segments are exactly those between the checkpoint and the
    crash, with the same values (the resume is exact); together the segments hold every step of
    metrics.jsonl with its value. Online, W&B continues the run after its last step and ignores the
    repeated steps (keeping the first attempt's rows); offline, both segments keep them.
    """
    run_dir = tmp_path / "run"
    args = [*ARGS, "--wandb", "offline", "--checkpoint-every-steps", "5", "--out", run_dir]
    crash_step = 14  # rank 1 dies after 14 steps: checkpoint at 10, steps 12 and 14 logged after it
    env = wb_env(tmp_path, mpl_dir)
    p = run_py(
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", FAIL, *args],
        env={**env, "FAIL_RANK": "1", "FAIL_STEP": str(crash_step)},
    )
    assert p.returncode != 0 and "injected failure" in p.stdout + p.stderr
    assert not (run_dir / "summary.json").exists()
    torchrun(2, [*args, "--resume", "auto"], env=env, check=0)

    (resume,) = read_events(run_dir, "resume")
    ckpt_step = resume["step"]
    assert ckpt_step == 10
    back = read_offline_run(run_dir)
    dirs = offline_run_dirs(run_dir)
    assert len(dirs) == 2 and back["run_ids"] == [back["run_id"]] * 2
    assert all(d.name.endswith("-" + back["run_id"]) for d in dirs)
    assert [s["resume"] for s in back["segments"]] == [False, True]

    first, second = (history_by_step(s["history"]) for s in back["segments"])
    for seg in back["segments"]:
        steps = [r["_step"] for r in seg["history"] if "train/loss" in r]
        assert steps == sorted(set(steps))  # strictly increasing within a segment
    assert max(first) <= crash_step
    assert min(second) == (ckpt_step // LOG_EVERY + 1) * LOG_EVERY > ckpt_step
    repeated = sorted(set(first) & set(second))
    assert repeated == [s for s in range(LOG_EVERY, crash_step + 1, LOG_EVERY) if s > ckpt_step] == [12, 14]
    for s in repeated:
        assert second[s] == pytest.approx(first[s], rel=1e-6)

    train = train_steps(run_dir)
    assert sorted(set(first) | set(second)) == sorted(train) == list(range(LOG_EVERY, TOTAL_STEPS + 1, LOG_EVERY))
    for s, e in train.items():
        assert {**first, **second}[s] == pytest.approx(e["loss"], rel=1e-12)
    summary = read_summary(run_dir)
    assert back["summary"]["test_accuracy"] == summary["test_accuracy"]
    assert back["summary"]["steps"] == TOTAL_STEPS


# --------------------------------------------------------------------------- modes and credentials


def wandb_paths(base):
    return sorted(str(p.relative_to(base)) for p in base.rglob("*") if "wandb" in p.name.lower())


def test_disabled_writes_no_wandb_files(tmp_path, mpl_dir):
    run_dir = tmp_path / "run"
    p = train([*ARGS, "--wandb", "disabled", "--out", run_dir], env=wb_env(tmp_path, mpl_dir), check=0)
    assert (run_dir / "summary.json").is_file()
    assert wandb_paths(tmp_path) == []  # no wandb dir/file under the run dir, HOME or the W&B dirs
    assert "wandb" not in (p.stdout + p.stderr).replace(str(tmp_path), "<tmp>").lower()


@pytest.mark.slow
def test_auto_without_credentials_goes_offline_and_says_how_to_sync(tmp_path, mpl_dir):
    run_dir = tmp_path / "run"
    env = wb_env(tmp_path, mpl_dir)  # empty HOME: no ~/.netrc, no settings file, no WANDB_API_KEY
    assert "WANDB_API_KEY" not in env and not any((tmp_path / "home").iterdir())
    p = train([*ARGS, "--wandb", "auto", "--out", run_dir], env=env, check=0)
    hints = [line for line in p.stdout.splitlines() if "wandb sync" in line]
    assert len(hints) == 1, p.stdout
    assert "offline" in hints[0] and str(run_dir / "wandb") in hints[0]
    back = read_offline_run(run_dir)
    assert len(offline_run_dirs(run_dir)) == 1
    assert back["summary"]["test_accuracy"] == read_summary(run_dir)["test_accuracy"]


@pytest.mark.slow
def test_api_key_is_never_written(tmp_path, mpl_dir):
    run_dir = tmp_path / "run"
    env = wb_env(tmp_path, mpl_dir, WANDB_API_KEY=FAKE_KEY)
    env.pop("WANDB_SILENT")  # the logger's own default, not the tests', keeps wandb quiet
    p = train([*ARGS, "--wandb", "offline", "--out", run_dir], env=env, check=0)
    forms = [FAKE_KEY.encode(), base64.b64encode(f"api:{FAKE_KEY}".encode()), FAKE_KEY[8:32].encode()]
    out = (p.stdout + p.stderr).encode()
    assert not any(f in out for f in forms)
    checked = 0
    for f in tmp_path.rglob("*"):  # run dir (incl. wandb/ and its debug logs), HOME, the W&B dirs
        if f.is_file() and not f.is_symlink():
            checked += 1
            data = f.read_bytes()
            assert not any(form in data for form in forms), f"API key leaked into {f}"
    assert checked >= 10
    back = read_offline_run(run_dir)
    assert FAKE_KEY not in json.dumps(back["config"]) and FAKE_KEY not in json.dumps(back["summary"], default=str)
    assert back["summary"]["test_accuracy"] == read_summary(run_dir)["test_accuracy"]
