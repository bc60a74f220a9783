"""fit() inside a process group the caller made (a notebook, Lightning, a user's launcher): it uses
that group, leaves it in place, and two runs in a row in one process work; world sizes 1 and 2 give
the same weights."""

from __future__ import annotations

import json

import pytest
import torch

from tests.support.common import ROOT, clean_env, run_py

SCRIPT = ROOT / "tests" / "support" / "existing_group.py"


def run_script(nproc: int, out) -> list[dict]:
    p = run_py(
        ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", SCRIPT, out],
        env=clean_env(OMP_NUM_THREADS="1"),
        timeout=300,
        check=0,
    )
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def weights(run_dir) -> dict:
    return torch.load(run_dir / "model.pt", weights_only=True)["model"]


@pytest.mark.slow
def test_fit_twice_inside_the_callers_group(tmp_path):
    two = run_script(2, tmp_path / "two")
    assert two == [{"run": r, "world_size": 2, "backend": "gloo"} for r in ("first", "second")], two
    one = run_script(1, tmp_path / "one")
    assert [r["world_size"] for r in one] == [1, 1], one
    w1, w2 = weights(tmp_path / "one" / "second"), weights(tmp_path / "two" / "second")
    assert w1.keys() == w2.keys()
    diff = max((w1[k].float() - w2[k].float()).abs().max().item() for k in w1)
    assert diff <= 1e-5, diff
    first = weights(tmp_path / "two" / "first")  # the same options twice: the same weights
    assert all(torch.equal(first[k], w2[k]) for k in w2)
