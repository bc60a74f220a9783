"""The scaling model's arithmetic (benchmarks/scaling_model.py): fit, all_reduce costs, DDP buckets, overlap."""

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sm():
    spec = importlib.util.spec_from_file_location("scaling_model", ROOT / "benchmarks" / "scaling_model.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_fit_recovers_alpha_and_beta(sm):
    alpha, beta = 150e-6, 1 / 2e9
    points = {n: 2 * alpha + n * beta for n in (64 << 10, 1 << 20, 16 << 20, 64 << 20)}
    a, b = sm.fit_alpha_beta(points)
    assert a == pytest.approx(alpha, rel=1e-6) and b == pytest.approx(beta, rel=1e-6)


def test_allreduce_costs(sm):
    net = sm.Net(gpus_per_node=8, nvlink_bps=360e9, nic_bps=45e9)
    assert sm.allreduce_seconds(1 << 20, 1, net) == (0.0, "-")
    n = 100 << 20
    one_node, algo = sm.allreduce_seconds(n, 8, net)
    ring = sm.RING_BASE_S + 14 * sm.RING_NVLINK_S + 2 * 7 / 8 * n / net.nvlink_bps
    assert algo == "ring" and one_node == pytest.approx(ring)
    times = [sm.allreduce_seconds(n, g, net)[0] for g in sm.GPU_COUNTS[1:]]
    assert times == sorted(times)  # more GPUs never make an all_reduce cheaper
    assert sm.allreduce_seconds(n // 2, 64, net)[0] < sm.allreduce_seconds(n, 64, net)[0]


def test_ddp_buckets_first_small_then_25_mib(sm):
    mib = 1 << 20
    ready = [(mib // 2, 0.1), (mib // 2, 0.2), (10 * mib, 0.5), (20 * mib, 0.8), (mib, 1.0)]
    assert sm.ddp_buckets(ready, 1.0) == [(mib, 0.2), (30 * mib, 0.8), (mib, 1.0)]
    assert sm.ddp_buckets(ready, 0.5)[1] == (15 * mib, 0.8)  # bf16 on the wire: half the bytes


def test_only_what_runs_past_backward_is_exposed(sm):
    net = sm.Net(gpus_per_node=8, nvlink_bps=360e9, nic_bps=45e9)
    early = [(1 << 20, 0.1)]
    exposed, total, _ = sm.exposed_comm(early, bwd_s=1.0, gpus=8, net=net)
    assert exposed == 0.0 and total > 0
    last = [(1 << 20, 1.0)]  # ready only when backward ends: nothing overlaps
    exposed, total, _ = sm.exposed_comm(last, bwd_s=1.0, gpus=8, net=net)
    assert exposed == pytest.approx(total)
