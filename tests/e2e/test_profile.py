"""--profile START:END under torchrun with 2 ranks: a Chrome trace per rank with the step's ops and the
gradient all_reduce, and rank 0's split of step time."""

import json

from tests.support.common import SMALL, torchrun, train


def test_profile_two_ranks_writes_traces_with_step_ops_and_all_reduce(tmp_path):
    out = tmp_path / "run"
    p = torchrun(2, [*SMALL, "--max-steps", "6", "--eval-every", "0", "--profile", "2:4", "--out", out], check=0)
    for rank in (0, 1):
        trace = json.loads((out / "profile" / f"rank{rank}.json").read_text())
        names = {e.get("name", "") for e in trace["traceEvents"] if e.get("ph") == "X"}
        assert any(n.startswith("aten::convolution") for n in names), sorted(names)[:50]
        assert any("ConvolutionBackward" in n for n in names)
        assert any("all_reduce" in n or "allreduce" in n for n in names), sorted(n for n in names if "::" not in n)
        assert {"dist_cnn/step 2", "dist_cnn/step 3"} <= names and "dist_cnn/step 4" not in names
        assert "dist_cnn/optimizer" in names and "dist_cnn/data_wait" in names
    summary = json.loads((out / "profile" / "summary.json").read_text())
    assert summary["steps"] == 2 and abs(sum(summary["split"].values()) - 1) < 1e-6
    assert summary["split"]["compute"] > 0 and summary["split"]["communication"] >= 0
    text = p.stdout + p.stderr
    assert text.count("profile of steps 2:4") == 1  # rank 0 only
    for word in ("data wait", "optimizer", "compute", "communication", "other", "top ops"):
        assert word in text


def test_bad_profile_range_is_one_line(tmp_path):
    p = train([*SMALL, "--profile", "5:2", "--out", tmp_path / "r"])
    assert p.returncode == 2 and "--profile" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "r").exists()
