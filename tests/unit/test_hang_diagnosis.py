"""The hang report's diagnosis from the ranks' heartbeats, and the phase marks. In-process."""

from __future__ import annotations

from pathlib import Path

from dist_cnn.observability import phases
from dist_cnn.observability.hang import diagnose
from dist_cnn.observability.phases import Phases

NOW = 1000.0


def beat(phase, step, seen_ago, since_ago=None):
    return {"phase": phase, "step": step, "time": NOW - seen_ago, "since": NOW - (since_ago or seen_ago)}


def test_a_silent_rank_is_named_with_its_last_phase_and_step():
    beats = {0: beat(phases.BACKWARD, 120, 1), 1: beat(phases.DATA_WAIT, 120, 41), 2: beat(phases.BACKWARD, 120, 1)}
    line = diagnose(beats, 3, NOW, Path("run"))
    assert line.startswith("rank 1 last seen 41 s ago in data wait at step 120; the others wait in backward")
    assert "stacks in run/hang" in line


def test_a_live_rank_stuck_outside_a_collective_is_named():
    beats = {0: beat(phases.FORWARD, 3, 1, 12), 1: beat(phases.DATA_WAIT, 3, 1, 12)}
    line = diagnose(beats, 2, NOW, Path("run"), reporter=0)
    assert line.startswith("rank 1 last seen 1 s ago in data wait at step 3 (there for 12 s)")
    beats = {r: beat(phases.BACKWARD, 7, 1) for r in range(4)} | {2: beat(phases.DATA_WAIT, 7, 1)}
    assert diagnose(beats, 4, NOW, Path("run")).startswith("rank 2 ")


def test_a_rank_that_never_reported():
    assert diagnose({0: beat(phases.SETUP, 0, 1)}, 2, NOW, Path("r")).startswith("rank 1 never reported")


def test_phase_marks_accumulate_time_and_nest():
    p = Phases()
    p.enter(phases.DATA_WAIT, 5)
    with p.during(phases.CHECKPOINT):
        assert p.snapshot()["phase"] == phases.CHECKPOINT and p.snapshot()["step"] == 5
    assert p.snapshot()["phase"] == phases.DATA_WAIT
    assert set(p.totals) >= {phases.SETUP, phases.DATA_WAIT, phases.CHECKPOINT}
