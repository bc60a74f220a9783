"""Checkpoints: exact resume after a crash, elastic restarts, corrupt files, pruning, write failures,
the non-finite guard, weights_only loading and `dist-cnn eval`."""

import json
import os
import subprocess

import pytest
import torch

from tests.support.common import NOISE, ROOT, SMALL, clean_env, read_events, read_summary, run_py, torchrun, train

FAIL = ROOT / "tests/support/fail_rank.py"
# 1024 images / batch 64 = 16 steps an epoch; 2 epochs; a checkpoint every 5 steps.
ARGS = [
    *SMALL,
    "--synthetic-train-size",
    "1024",
    "--epochs",
    "2",
    "--checkpoint-every-steps",
    "5",
    "--log-every",
    "4",
    "--crop-padding",
    "2",
    "--flip",
]


def history(run_dir):
    return [
        {k: v for k, v in e.items() if k not in NOISE} for e in read_events(run_dir) if e["event"] in ("train", "eval")
    ]


def max_diff(a, b):
    wa, wb = (torch.load(d / "model.pt", weights_only=True)["model"] for d in (a, b))
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def crash_then_resume(out, nproc, fail_step, extra=()):
    launch = (lambda a, **kw: torchrun(nproc, a, **kw)) if nproc > 1 else train
    env = clean_env(FAIL_RANK=str(nproc - 1), FAIL_STEP=str(fail_step))
    cmd = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", FAIL] if nproc > 1 else [FAIL]
    p = run_py([*cmd, *ARGS, *extra, "--out", out], env=env)
    assert p.returncode != 0 and "injected failure" in p.stdout + p.stderr
    assert not (out / "summary.json").exists()
    return launch([*ARGS, *extra, "--out", out, "--resume", "auto"], check=0)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """straight(nproc): the run directory of ARGS trained without a crash on `nproc` ranks, trained once
    for the module (every test comparing a resumed run against it reads the same run)."""
    runs = {}

    def get(nproc):
        if nproc not in runs:
            runs[nproc] = tmp_path_factory.mktemp(f"straight{nproc}") / "run"
            launch = (lambda a, **kw: torchrun(nproc, a, **kw)) if nproc > 1 else train
            launch([*ARGS, "--out", runs[nproc]], check=0)
        return runs[nproc]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_exact_resume_mid_epoch(tmp_path, straight, nproc):
    p = crash_then_resume(tmp_path / "resumed", nproc, fail_step=27)  # epoch 2, step 11 of 16
    assert "resumed from" in p.stdout and "step-00000025.pt" in p.stdout
    assert max_diff(straight(nproc), tmp_path / "resumed") <= 1e-6
    assert history(straight(nproc)) == history(tmp_path / "resumed")
    assert read_summary(tmp_path / "resumed")["steps"] == 32


@pytest.mark.slow
def test_corrupt_newest_checkpoint_is_skipped(tmp_path, straight):
    out = tmp_path / "r"
    env = clean_env(FAIL_RANK="0", FAIL_STEP="13")
    assert run_py([FAIL, *ARGS, "--out", out], env=env).returncode != 0
    newest = out / "checkpoints" / "step-00000010.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated, as by a crash mid-copy
    p = train([*ARGS, "--out", out, "--resume", "auto"], check=0)
    assert "skipping" in p.stdout and "step-00000010.pt" in p.stdout
    assert "resumed from" in p.stdout and "step-00000005.pt" in p.stdout
    assert max_diff(straight(1), out) <= 1e-6


def test_keep_k_pruning_and_best(tmp_path):
    out = tmp_path / "r"
    train([*ARGS, "--out", out, "--checkpoint-every-steps", "3", "--keep-checkpoints", "2"], check=0)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["best.pt", "step-00000030.pt", "step-00000032.pt"], names
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    evals = read_events(out, "eval")
    assert best["best_acc"] == max(e["test_accuracy"] for e in evals)


def _make_unwritable(path):
    if os.geteuid() == 0:  # root ignores permissions; the immutable flag stops root too
        subprocess.run(["chattr", "+i", str(path)], check=True)
    else:
        path.chmod(0o555)


def _make_writable(path):
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        path.chmod(0o755)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["continue", "stop"])
def test_failed_write_keeps_previous_checkpoint(tmp_path, policy):
    out = tmp_path / "r"
    assert run_py([FAIL, *ARGS, "--out", out], env=clean_env(FAIL_RANK="0", FAIL_STEP="13")).returncode != 0
    ckdir = out / "checkpoints"
    before = {p.name: p.read_bytes() for p in ckdir.iterdir()}
    _make_unwritable(ckdir)
    try:
        p = train([*ARGS, "--out", out, "--resume", "auto", "--on-write-error", policy])
    finally:
        _make_writable(ckdir)
    assert "checkpoint write failed" in p.stdout + p.stderr
    assert {p.name: p.read_bytes() for p in ckdir.iterdir()} == before
    if policy == "continue":
        assert p.returncode == 0 and read_summary(out)["steps"] == 32
    else:
        assert p.returncode == 1 and "Traceback" not in p.stderr and not (out / "summary.json").exists()


@pytest.mark.parametrize("nproc", [1, 2])
def test_nonfinite_guard_stops_and_keeps_good_checkpoint(tmp_path, nproc):
    out = tmp_path / "r"
    launch = (lambda a: torchrun(2, a)) if nproc > 1 else train
    p = launch([*SMALL, "--lr", "1e8", "--schedule", "constant", "--checkpoint-every-steps", "1", "--out", out])
    assert p.returncode == 1 and "NaN/Inf" in p.stderr, p.stderr
    if nproc == 1:  # (plain torchrun adds its own report of the failed workers)
        assert "Traceback" not in p.stderr
    ckpts = sorted((out / "checkpoints").glob("step-*.pt"))
    assert ckpts
    state = torch.load(ckpts[-1], weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    bad = read_events(out, "nonfinite")
    assert [e["consecutive"] for e in bad][-3:] == [1, 2, 3]


INF_ONCE = """
import os, torch
from dist_cnn.models.registry import build_model

class InfOnce(torch.nn.Module):
    # rank 1's fifth training step: an infinite loss (every target class at -inf) with finite gradients
    def __init__(self, c, k, s):
        super().__init__()
        self.net, self.calls = build_model("seed", c, k, s), 0
    def forward(self, x):
        out = self.net(x)
        if self.training and os.environ.get("RANK") == "1":
            self.calls += 1
            if self.calls == 5:
                out = out + torch.full_like(out, float("-inf")).index_fill(1, torch.tensor([0]), 0.0)
        return out

def build(in_channels, num_classes, image_size):
    return InfOnce(in_channels, num_classes, image_size)
"""


def test_one_ranks_nonfinite_loss_skips_the_step_on_every_rank(tmp_path):
    """Rank 1 alone sees an infinite loss whose gradients are finite: every rank skips that step (on the
    CPU the ranks find it in the averaged gradients, without a vote that step), and training goes on."""
    (tmp_path / "badloss").mkdir()
    (tmp_path / "badloss" / "__init__.py").write_text("")
    (tmp_path / "badloss" / "nets.py").write_text(INF_ONCE)
    out = tmp_path / "r"
    torchrun(2, [*SMALL, "--model", "badloss.nets:build", "--out", out], cwd=tmp_path, check=0)
    assert [e["consecutive"] for e in read_events(out, "nonfinite")] == [1]
    assert read_summary(out)["skipped_steps"] == 1
    state = torch.load(out / "model.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


class Evil:
    def __reduce__(self):
        return (os.system, ("touch EVIL_RAN",))


@pytest.mark.slow
def test_pickled_object_checkpoint_is_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "config": {}, "payload": Evil()}, evil)
    for args in (
        ["-m", "dist_cnn.cli", "eval", "--checkpoint", evil],
        [ROOT / "train.py", *SMALL, "--resume", evil, "--out", tmp_path / "r"],
    ):
        p = run_py(args, cwd=tmp_path)
        assert p.returncode == 2 and "weights_only" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "EVIL_RAN").exists()


def test_other_model_checkpoint_is_a_clear_error(tmp_path):
    out = tmp_path / "r"
    assert run_py([FAIL, *ARGS, "--out", out], env=clean_env(FAIL_RANK="0", FAIL_STEP="6")).returncode != 0
    p = train(
        [*SMALL, "--model", "resnet18", "--resume", out / "checkpoints" / "step-00000005.pt", "--out", tmp_path / "r2"]
    )
    assert p.returncode == 2 and "checkpoint is for --model seed" in p.stderr


@pytest.mark.slow
def test_eval_command_matches_training(tmp_path):
    out = tmp_path / "r"
    train([*SMALL, "--out", out], check=0)
    final = sorted((out / "checkpoints").glob("step-*.pt"))[-1]
    run_py(["-m", "dist_cnn.cli", "eval", "--checkpoint", final], check=0)
    ev = json.loads(final.with_name(f"eval-{final.stem}.json").read_text())
    s = read_summary(out)
    assert (ev["test_correct"], ev["test_total"]) == (s["test_correct"], s["test_total"])


@pytest.mark.slow
def test_elastic_restart_after_sigkill(tmp_path):
    out = tmp_path / "r"
    env = clean_env(FAIL_RANK="1", FAIL_STEP="23", FAIL_MODE="kill")
    p = run_py(
        [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "--max-restarts=1",
            FAIL,
            *ARGS,
            "--out",
            out,
        ],
        env=env,
        timeout=400,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    s = read_summary(out)
    assert s["steps"] == 32 and s["epochs"] == 2
    resumes = read_events(out, "resume")
    assert [r["step"] for r in resumes] == [20]
