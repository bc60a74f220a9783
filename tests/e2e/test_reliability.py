"""Reliability end to end: real runs in subprocesses (bad values, run-directory locks, resume rules,
write failures, signals, launch scripts)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.common import PY, ROOT, SMALL, clean_env, read_summary, run_py, train, wait_until


# The same values and more are refused in-process (tests/unit/test_cli_bad_input.py); these two are
# the real process's exit code and stderr.
@pytest.mark.parametrize(
    "args,needle",
    [
        (["--lr", "inf"], "--lr must be a finite number"),
        (["--checkpoint-every-minutes", "nan"], "--checkpoint-every-minutes must be a finite number"),
    ],
)
def test_bad_values_in_a_real_process(tmp_path, args, needle):
    p = train([*SMALL, "--out", tmp_path / "run", *args])
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and needle in lines[0], p.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_wandb_keeps_its_files_under_the_run_directory(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(HOME=str(home), WANDB_MODE="offline")
    env.pop("XDG_CACHE_HOME", None)
    train([*SMALL, "--max-steps", "2", "--wandb", "offline", "--out", tmp_path / "run"], env=env, check=0)
    assert [p for p in home.rglob("*") if "wandb" in str(p.relative_to(home))] == []
    assert (tmp_path / "run" / "wandb" / ".cache").is_dir()
    # The user's own choice wins.
    mine = tmp_path / "mycache"
    env["WANDB_CACHE_DIR"] = str(mine)
    train([*SMALL, "--max-steps", "2", "--wandb", "offline", "--out", tmp_path / "run2"], env=env, check=0)
    assert mine.is_dir() and not (tmp_path / "run2" / "wandb" / ".cache").exists()


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK=2"),
        ({"RANK": "0", "WORLD_SIZE": "2.5"}, "WORLD_SIZE='2.5'"),
        ({"RANK": "1", "WORLD_SIZE": "2"}, "LOCAL_RANK is not set"),
        (
            {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "no.such.host.invalid"},
            "does not resolve",
        ),
    ],
)
def test_contradictory_launch_environment_is_one_line_before_anything_runs(tmp_path, env, needle):
    p = train([*SMALL, "--out", tmp_path / "run"], env=clean_env(**env), timeout=120)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and needle in lines[0], p.stderr
    assert not (tmp_path / "run").exists()


def launch_node(args, tmp_path, **env):
    return subprocess.run(
        ["bash", ROOT / "launch/node.sh", "--procs", "2", *map(str, args)],
        cwd=tmp_path,
        env=clean_env(DIST_CNN_PYTHON=sys.executable, OMP_NUM_THREADS="1", **env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_node_launch_with_a_bad_flag_is_one_line_before_torchrun_starts(tmp_path):
    p = launch_node([*SMALL, "--lr", "nan", "--out", tmp_path / "run"], tmp_path)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and lines == ["error: --lr must be a finite number, got nan"], p.stderr
    assert not (tmp_path / "run").exists()


def test_node_launch_error_found_by_the_workers_is_their_line_only(tmp_path):
    p = launch_node(
        ["--dataset", "imagefolder", "--data-dir", tmp_path / "none", "--wandb", "disabled", "--out", tmp_path / "run"],
        tmp_path,
    )
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "[rank 0] error: imagefolder" in lines[0], p.stderr
    assert "ChildFailedError" not in p.stderr and "Traceback" not in p.stderr


def test_node_launch_crash_is_reported_in_one_torchrun_line(tmp_path):
    env = clean_env(
        DIST_CNN_PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        FAIL_RANK="1",
        FAIL_STEP="2",
        FAIL_MODE="kill",
        PYTHONPATH=f"{ROOT}",
    )
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "dist_cnn.distributed.torchrun",
            "--standalone",
            "--nproc_per_node=2",
            ROOT / "tests/support/fail_rank.py",
            *SMALL,
            "--out",
            tmp_path / "run",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 128 + 9, p.stderr
    assert "rank 1" in p.stderr and "SIGKILL" in p.stderr and "ChildFailedError" not in p.stderr, p.stderr


# ------------------------------------------------------------------------------------ run directory


def lines_of(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def start(args, script: Path = ROOT / "train.py", **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [PY, script, *map(str, args)],
        cwd=ROOT,
        env=clean_env(OMP_NUM_THREADS="1", **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(pred, proc, timeout=180.0):
    def ready():
        if proc.poll() is not None and not pred():
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        return pred()

    wait_until(ready, timeout, "event in metrics.jsonl")


def events(out: Path, kind: str) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass  # a line being written
    return [r for r in rows if r.get("event") == kind]


SLOW_TRAIN = ROOT / "tests" / "support" / "slow_train.py"
LONG = [*SMALL, "--epochs", "40", "--log-every", "4", "--checkpoint-every-steps", "8"]


def test_a_second_run_into_the_same_out_fails_at_once_naming_the_holder(tmp_path):
    out, gate = tmp_path / "run", tmp_path / "gate"
    # the first run holds at its first step until the second has been refused: it is surely still running
    first = start(
        [*LONG, "--epochs", "3", "--out", out, "--seed", "1"], SLOW_TRAIN, STEP_GATE=str(gate), STEP_SLEEP="0"
    )
    try:
        wait_for(lambda: (out / "config.json").exists(), proc=first)
        p = train([*LONG, "--out", out, "--seed", "2", "--resume", "auto"], timeout=120)
        (line,) = lines_of(p.stderr)
        assert p.returncode == 2 and "in use by another run" in line and f"pid {first.pid}" in line, p.stderr
    finally:
        gate.touch()
        first.communicate(timeout=300)
    assert first.returncode == 0
    assert json.loads((out / "config.json").read_text())["train"]["seed"] == 1
    assert read_summary(out)["steps"] == 3 * 32


def test_a_non_empty_foreign_directory_is_refused(tmp_path):
    (tmp_path / "notes.md").write_text("mine")
    (tmp_path / "config.json").write_text('{"mine": true}')
    p = train([*SMALL, "--out", tmp_path])
    assert p.returncode == 2 and "not a dist_cnn run directory" in p.stderr and len(lines_of(p.stderr)) == 1
    assert sorted(x.name for x in tmp_path.iterdir()) == ["config.json", "notes.md"]
    assert (tmp_path / "config.json").read_text() == '{"mine": true}'


def test_metrics_never_name_a_pruned_checkpoint(tmp_path):
    out = tmp_path / "run"
    train([*SMALL, "--checkpoint-every-steps", "4", "--keep-checkpoints", "1", "--out", out], check=0)
    named = [e for e in events(out, "checkpoint") if "path" in e]
    assert named and all(Path(e["path"]).exists() for e in named)
    assert len(events(out, "checkpoint")) > len(named)  # the pruned ones are marked, not named


# ------------------------------------------------------------------------------------ resume rules


def crashed_run(tmp_path) -> Path:
    """A run that died at step 13 with checkpoints every 4 steps (no summary)."""
    out = tmp_path / "run"
    p = run_py(
        [ROOT / "tests/support/fail_rank.py", *SMALL, "--checkpoint-every-steps", "4", "--out", out],
        env=clean_env(FAIL_RANK="0", FAIL_STEP="13"),
    )
    assert p.returncode != 0 and (out / "checkpoints" / "step-00000012.pt").exists()
    return out


@pytest.mark.slow
def test_resume_with_changed_batch_is_refused_and_the_same_resumes(tmp_path):
    # The other refused changes (training-set size, a checkpoint past the end) are checked in-process:
    # tests/unit/test_reliability_resume.py. This one is the real process's exit code and stderr.
    out = crashed_run(tmp_path)
    change = ["--batch-size", "128"]
    p = train([*SMALL, "--checkpoint-every-steps", "4", "--out", out, "--resume", "auto", *change], timeout=120)
    assert p.returncode == 2 and "--batch-size 64" in p.stderr and len(lines_of(p.stderr)) == 1, p.stderr
    p = train([*SMALL, "--checkpoint-every-steps", "4", "--out", out, "--resume", "auto", "--grad-accum", "2"])
    assert p.returncode == 0, p.stderr
    assert read_summary(out)["steps"] == 32 and read_summary(out)["epochs"] == 1


@pytest.mark.slow
def test_resume_of_a_model_export_or_a_tensor_is_one_line_before_data(tmp_path):
    out = tmp_path / "done"
    train([*SMALL, "--max-steps", "2", "--out", out], check=0)
    torch.save(torch.zeros(3), tmp_path / "t.pt")
    for path, needle in ((out / "model.pt", "model export"), (tmp_path / "t.pt", "bare tensor")):
        p = train([*SMALL, "--out", tmp_path / "new", "--resume", path], timeout=120)
        assert p.returncode == 2 and needle in p.stderr and len(lines_of(p.stderr)) == 1, p.stderr


# ------------------------------------------------------------------------------------ write failures


@pytest.fixture
def tiny_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)])


@pytest.mark.parametrize("policy", ["continue", "stop"])
def test_a_full_disk_follows_the_write_error_policy_without_a_traceback(tiny_disk, policy):
    p = train([*SMALL, "--checkpoint-every-steps", "4", "--out", tiny_disk / "run", "--on-write-error", policy])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "No space left" in p.stdout + p.stderr or "write failed" in p.stdout + p.stderr
    if policy == "continue":
        assert p.returncode == 0, p.stderr
    else:
        (line,) = lines_of(p.stderr)
        assert p.returncode == 1 and line.startswith("error: "), p.stderr


# ------------------------------------------------------------------------------------ signals


@pytest.mark.slow
def test_sigterm_during_a_long_evaluation_cuts_it_short_and_exits_unfinished(tmp_path):
    out = tmp_path / "run"
    # resnet18 on 20,000 test images with 6-view test-time augmentation: minutes of evaluation on a CPU.
    proc = start(
        [
            *SMALL,
            "--model",
            "resnet18",
            "--max-steps",
            "2",
            "--log-every",
            "1",
            "--tta",
            "2",
            "--synthetic-test-size",
            "20000",
            "--out",
            out,
        ]
    )
    wait_for(lambda: any(e["step"] == 2 for e in events(out, "train")), proc=proc)
    # Step 2 is the last and its stop vote is in: the signal is seen by the evaluation, which polls for
    # it about once a second from its start.
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "evaluation cut short" in stdout and "Traceback" not in stderr
    assert events(out, "eval") == [] and events(out, "checkpoint")[-1]["step"] == 2
    assert not (out / "summary.json").exists()


@pytest.mark.slow
def test_first_ctrl_c_checkpoints_and_stops_second_aborts(tmp_path):
    out = tmp_path / "run"
    proc = start([*LONG, "--out", out])
    wait_for(lambda: events(out, "train"), proc=proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Ctrl-C again" in stderr and "Traceback" not in stderr
    last = events(out, "checkpoint")[-1]["step"]
    assert (out / "checkpoints" / f"step-{last:08d}.pt").exists() and last < 40 * 32
    # A second Ctrl-C aborts at once, without waiting for the step to end or the checkpoint. resnet18
    # steps take seconds on a CPU, so the second one lands while the first still waits for its step.
    slow = tmp_path / "slow"
    proc = start([*SMALL, "--model", "resnet18", "--log-every", "1", "--out", slow])
    wait_for(lambda: events(slow, "train"), proc=proc)
    proc.send_signal(signal.SIGINT)
    # two signals sent back to back can reach Python's handler as one: the second follows the first's answer
    answered = any("Ctrl-C again" in line for line in iter(proc.stderr.readline, ""))
    assert answered, "no answer to the first Ctrl-C"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in stderr and "Traceback" not in stderr, stderr
    assert events(slow, "checkpoint") == []
