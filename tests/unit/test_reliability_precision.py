"""`--precision auto` resolves the same way for the same command, machine, model and batch."""

from __future__ import annotations

import json

import torch

from dist_cnn.train import precision as P

WHAT = {"model": "seed", "input": [3, 32, 32], "batch": 64}


def timer(fp32: float, bf16: float, calls: list):
    def seconds(p):
        calls.append(p)
        return {"fp32": fp32, "bf16": bf16}[p]

    return seconds


def test_auto_on_a_bf16_cpu_is_measured_once_and_then_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: True)
    calls = []
    first, why = P.resolve_auto(torch.device("cpu"), WHAT, timer(1.0, 0.5, calls))
    assert first == "bf16" and "measured now" in why and calls
    # A busy machine now would time bf16 as slower: the cached decision stands.
    calls.clear()
    again, why = P.resolve_auto(torch.device("cpu"), WHAT, timer(0.5, 1.0, calls))
    assert again == "bf16" and "measured before" in why and calls == []
    # Another batch is another workload: measured on its own.
    other, _ = P.resolve_auto(torch.device("cpu"), {**WHAT, "batch": 8}, timer(0.5, 1.0, calls))
    assert other == "fp32" and calls
    assert len(json.loads((tmp_path / "dist_cnn" / "precision.json").read_text())) == 2


def test_auto_without_native_bf16_is_a_rule_with_its_reason(monkeypatch):
    monkeypatch.setattr(P, "cpu_has_native_bf16", lambda: False)
    calls = []
    assert P.resolve_auto(torch.device("cpu"), WHAT, timer(1, 0.1, calls)) == (
        "fp32",
        "the CPU has no native bf16 (AMX or AVX-512 BF16)",
    )
    assert calls == []


# compute capability -> bf16 in hardware: emulated bf16 (Volta, Turing) is slower than their fp16
GPUS = {
    "P100": ((6, 0), False),
    "V100": ((7, 0), False),
    "T4": ((7, 5), False),
    "A100": ((8, 0), True),
    "A10 / RTX 3090": ((8, 6), True),
    "L4 / RTX 4090": ((8, 9), True),
    "H100 / H200": ((9, 0), True),
    "B200": ((10, 0), True),
    "RTX 5090": ((12, 0), True),
}


def test_auto_on_a_gpu_picks_bf16_only_where_the_hardware_has_it():
    for name, (capability, native) in GPUS.items():
        assert P.gpu_native_bf16(capability) is native, name
    assert P.gpu_native_bf16((7, 0), hip=True)  # torch counts every ROCm GPU it supports as bf16-capable


def test_a_bf16_checkpoint_resumes_in_fp16_with_a_fresh_loss_scale():
    bf16 = P.grad_scaler("bf16", torch.device("cpu")).state_dict()  # disabled: saves nothing
    assert bf16 == {}
    fp16 = torch.amp.GradScaler("cpu", enabled=True)  # what --precision fp16 builds (on CUDA)
    assert not P.load_scaler(fp16, bf16) and fp16.get_scale() == 65536.0
    saved = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)
    saved.scale(torch.ones(1))  # the scale tensor exists once used
    assert P.load_scaler(fp16, saved.state_dict()) and fp16.get_scale() == 1024.0
    assert P.load_scaler(P.grad_scaler("bf16", torch.device("cpu")), saved.state_dict())  # fp16 -> bf16: ignored
