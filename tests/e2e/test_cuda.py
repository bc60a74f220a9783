"""CUDA-only checks (`python -m pytest -m cuda tests/`): fp16 with a GradScaler, bf16, NCCL through torchrun,
the device-resident pipeline on the GPU, and --compile. Each trains the seed model on small synthetic data
through train.py. Skipped, with the reason shown (-ra), where torch sees no CUDA GPU; tools/gpu_check.sh
runs them on a lent GPU machine."""

import pytest
import torch

from tests.support.common import SMALL_ANY_PRECISION, read_events, read_summary, torchrun, train

GPU_COUNT = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(GPU_COUNT == 0, reason="needs a CUDA GPU: torch.cuda.is_available() is False here"),
]


def _learned(summary, floor=0.3):
    assert summary["test_accuracy"] > floor, summary  # 10 classes: chance is 0.1


def test_fp16_gradscaler_run(tmp_path):
    out = tmp_path / "run"
    train([*SMALL_ANY_PRECISION, "--epochs", "2", "--precision", "fp16", "--log-every", "8", "--out", out], check=0)
    s = read_summary(out)
    assert s["precision"] == "fp16" and s["device"].startswith("cuda") and s["steps"] == 64, s
    # the loss is computed in fp32 under autocast, so a sane LR never sees a non-finite loss: no step is
    # skipped by the trainer (the scaler may still skip overflowing fp16 gradients; scaler_scale shows that)
    assert s["skipped_steps"] == 0 and read_events(out, "nonfinite") == [], s
    trains = read_events(out, "train")
    assert trains and all("scaler_scale" in t and t["scaler_scale"] > 0 for t in trains), trains[:2]
    _learned(s)


def test_fp16_overflowing_steps_are_skipped_and_counted(tmp_path):
    """An absurd LR drives the weights to where fp16 overflows: the loss goes inf/NaN, the scaler skips
    those updates, the trainer counts them (fp16 does not stop on them) and the run still finishes."""
    out = tmp_path / "run"
    train(
        [
            *SMALL_ANY_PRECISION,
            "--precision",
            "fp16",
            "--lr",
            "1e20",
            "--schedule",
            "constant",
            "--max-steps",
            "24",
            "--log-every",
            "4",
            "--eval-every",
            "0",
            "--out",
            out,
        ],
        check=0,
    )
    s = read_summary(out)
    assert s["precision"] == "fp16" and s["steps"] == 24, s
    nonfinite = read_events(out, "nonfinite")
    assert s["skipped_steps"] > 0 and s["skipped_steps"] == len(nonfinite), (s["skipped_steps"], nonfinite[:3])


def test_bf16_run(tmp_path):
    out = tmp_path / "run"
    train([*SMALL_ANY_PRECISION, "--epochs", "2", "--precision", "bf16", "--out", out], check=0)
    s = read_summary(out)
    assert s["precision"] == "bf16" and s["skipped_steps"] == 0, s
    _learned(s)


def test_auto_precision_on_the_gpu_is_a_half_type(tmp_path):
    out = tmp_path / "run"
    train([*SMALL_ANY_PRECISION, "--precision", "auto", "--max-steps", "8", "--eval-every", "0", "--out", out], check=0)
    expected = "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    assert read_summary(out)["precision"] == expected


def test_the_bf16_rule_agrees_with_torch_on_this_gpu():
    from dist_cnn.train.precision import cuda_bf16

    assert cuda_bf16(torch.device("cuda", 0)) == torch.cuda.is_bf16_supported(including_emulation=False)


def test_torchrun_one_process_on_the_gpu_joins_no_group(tmp_path):
    """One process joins no process group (distributed.setup), so `--backend nccl` is accepted and unused:
    NCCL itself is exercised by test_nccl_group_of_one_runs_ddp (any GPU) and test_nccl_torchrun_world_size_2."""
    out = tmp_path / "run"
    p = torchrun(1, [*SMALL_ANY_PRECISION, "--precision", "bf16", "--backend", "nccl", "--out", out], check=0)
    s = read_summary(out)
    assert (s["world_size"], s["backend"], s["device"]) == (1, "none", "cuda:0"), s
    _learned(s)
    assert "Traceback" not in p.stderr


def test_nccl_group_of_one_runs_ddp(tmp_path):
    """train.py joins no process group at world size 1, so this checks the NCCL stack itself: a group of
    one, an all_reduce, and DDP (with dist_cnn's wrapping settings) through a training step."""
    import subprocess
    import sys

    from tests.support.common import ROOT, clean_env, free_port

    code = (
        "import torch, torch.distributed as dist\n"
        "from dist_cnn.models.registry import build_model\n"
        f"dist.init_process_group('nccl', init_method='tcp://127.0.0.1:{free_port()}', rank=0, world_size=1,\n"
        "                        device_id=torch.device('cuda', 0))\n"
        "t = torch.ones(4, device='cuda'); dist.all_reduce(t); assert t.tolist() == [1.0] * 4\n"
        "m = torch.nn.parallel.DistributedDataParallel(build_model('seed', 3, 10, 32).cuda(), device_ids=[0],\n"
        "        gradient_as_bucket_view=True, static_graph=True)\n"
        "opt = torch.optim.SGD(m.parameters(), lr=0.1, fused=True)\n"
        "for _ in range(3):\n"
        "    loss = torch.nn.functional.cross_entropy(m(torch.randn(8, 3, 32, 32, device='cuda')),\n"
        "                                             torch.randint(0, 10, (8,), device='cuda'))\n"
        "    loss.backward(); opt.step(); opt.zero_grad()\n"
        "torch.cuda.synchronize(); dist.destroy_process_group(); print('nccl ok', torch.cuda.nccl.version())\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=clean_env(PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0 and "nccl ok" in p.stdout, p.stdout[-2000:] + p.stderr[-4000:]


def test_the_trainer_in_an_nccl_group_of_one(tmp_path):
    """dist_cnn's own NCCL code on one GPU (DIST_CNN_GROUP_OF_ONE=1): DDP wrapping, the step agreement
    (found_inf for fused SGD under fp16's scaler), no_sync accumulation, object collectives, evaluation and
    teardown, with the NCCL error handling the trainer sets."""
    from tests.support.common import clean_env

    out = tmp_path / "run"
    args = [*SMALL_ANY_PRECISION, "--epochs", "2", "--precision", "fp16", "--grad-accum", "2", "--backend", "nccl"]
    p = train([*args, "--out", out], env=clean_env(DIST_CNN_GROUP_OF_ONE="1"), check=0)
    s = read_summary(out)
    assert (s["world_size"], s["backend"], s["device"], s["grad_accum"]) == (1, "nccl", "cuda:0", 2), s
    _learned(s)
    assert "Traceback" not in p.stderr, p.stderr[-3000:]


@pytest.mark.skipif(GPU_COUNT < 2, reason="needs 2 CUDA GPUs for an NCCL group of 2")
def test_nccl_torchrun_world_size_2(tmp_path):
    out = tmp_path / "run"
    torchrun(2, [*SMALL_ANY_PRECISION, "--precision", "bf16", "--backend", "nccl", "--out", out], check=0)
    s = read_summary(out)
    assert s["world_size"] == 2 and s["backend"] == "nccl" and s["per_rank_batch_size"] == 32, s
    _learned(s)


def test_device_resident_pipeline_on_the_gpu(tmp_path):
    out = tmp_path / "run"
    train(
        [
            *SMALL_ANY_PRECISION,
            "--epochs",
            "2",
            "--precision",
            "bf16",
            "--loader",
            "device",
            "--crop-padding",
            "2",
            "--flip",
            "--alternate-flip",
            "--out",
            out,
        ],
        check=0,
    )  # augmentation: the batched crop/flip on the GPU
    s = read_summary(out)
    assert s["loader"] == "device" and s["device"].startswith("cuda"), s
    _learned(s)


def test_auto_loader_picks_device_on_the_gpu(tmp_path):
    out = tmp_path / "run"
    train([*SMALL_ANY_PRECISION, "--precision", "bf16", "--max-steps", "4", "--eval-every", "0", "--out", out], check=0)
    assert read_summary(out)["loader"] == "device"  # 2048 tiny images fit on any GPU


def test_dataloader_pipeline_on_the_gpu(tmp_path):
    out = tmp_path / "run"
    train(
        [*SMALL_ANY_PRECISION, "--precision", "bf16", "--loader", "dataloader", "--workers", "2", "--out", out], check=0
    )
    s = read_summary(out)
    assert s["loader"] == "dataloader" and s["device"].startswith("cuda"), s
    _learned(s)


def test_compile_run(tmp_path):
    runs = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        out = tmp_path / name
        train(
            [*SMALL_ANY_PRECISION, "--epochs", "2", "--precision", "bf16", "--log-every", "8", *extra, "--out", out],
            check=0,
            timeout=190,
        )
        runs[name] = (read_summary(out), read_events(out, "train"))
    (se, te), (sc, tc) = runs["eager"], runs["compiled"]
    assert sc["steps"] == se["steps"] == 64
    _learned(sc)
    assert abs(tc[-1]["loss"] - te[-1]["loss"]) < 0.15, (tc[-1]["loss"], te[-1]["loss"])
    assert abs(sc["test_accuracy"] - se["test_accuracy"]) < 0.1, (sc["test_accuracy"], se["test_accuracy"])


@pytest.mark.skipif(GPU_COUNT < 2, reason="needs 2 CUDA GPUs for an NCCL group of 2")
def test_nccl_timeout_ends_in_one_line(tmp_path):
    """Rank 1 hangs (SIGSTOP) at step 3: rank 0's collective times out after --timeout, NCCL's watchdog
    aborts the communicator (TORCH_NCCL_ASYNC_ERROR_HANDLING=2) and rank 0 leaves with gloo's one line."""
    from tests.support.common import ROOT, clean_env, run_py

    out = tmp_path / "run"
    args = [*SMALL_ANY_PRECISION, "--precision", "bf16", "--backend", "nccl", "--timeout", "20", "--out", out]
    cmd = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", ROOT / "tests/support/fail_rank.py"]
    p = run_py([*cmd, *args], env=clean_env(FAIL_RANK="1", FAIL_STEP="3", FAIL_MODE="stop"), timeout=180)
    assert p.returncode != 0, p.stdout[-2000:]
    text = p.stdout + p.stderr
    assert "lost contact with another process of the job" in text, text[-4000:]
    assert "[rank0]: Traceback" not in text, text[-4000:]
