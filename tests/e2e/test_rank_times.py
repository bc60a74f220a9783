"""Per-rank time accounting on a real 2-rank run: one rank made slow in its data path is named."""

import pytest

from tests.support.common import SMALL, clean_env, read_events, run_py, torchrun

# test only: rank 1 sleeps before each of its batches (dist_cnn.observability.rank_times.delayed_for_test)
SLOW_DATA = {"DIST_CNN_TEST_SLOW_DATA": "1:0.2"}


@pytest.mark.slow
def test_a_rank_slow_in_its_data_path_is_named_with_data_wait(tmp_path):
    out = tmp_path / "run"
    args = [*SMALL, "--max-steps", "10", "--log-every", "2", "--out", out]
    p = torchrun(2, args, env=clean_env(**SLOW_DATA), check=0)
    named = [line for line in p.stdout.splitlines() if "slower than the median" in line]
    assert len(named) == 1 and named[0].startswith("rank 1 is "), p.stdout
    assert "data wait" in named[0] and "--workers" in named[0]

    train = read_events(out, "train")
    assert all(len(r["rank_data_wait_ms"]) == 2 and len(r["rank_step_ms"]) == 2 for r in train)
    later = train[1:]
    assert all(r["rank_data_wait_ms"][1] >= 190 > r["rank_data_wait_ms"][0] for r in later)
    assert [r.get("straggler_rank") for r in train][3:] == [1, 1]  # from the third slow interval on

    report = run_py(["-m", "dist_cnn.cli", "report", out], check=0).stdout
    assert "rank_times.png" in report and "communication wait" in report
