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
