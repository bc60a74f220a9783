"""Per-rank time accounting: the gather through the agreement vector, the straggler rule, the clocks."""

import torch

from dist_cnn.observability import rank_times as rt
from dist_cnn.observability.report import rank_breakdown


def figures(step_parts: list[list[float]]) -> dict[str, list[float]]:
    """[[data, fb, comm, opt] seconds per rank] -> the unpacked form rank 0 sees."""
    world = len(step_parts)
    vectors = [rt.slots(r, world, [*parts, 10.0]) for r, parts in enumerate(step_parts)]
    return rt.unpack(torch.stack(vectors).max(0).values.tolist(), world)


def test_each_rank_fills_its_own_slots_so_the_max_over_ranks_gathers_them():
    f = figures([[0.001, 0.020, 0.004, 0.002], [0.030, 0.021, 0.0, 0.002]])
    assert f["rank_data_wait_ms"] == [1.0, 30.0] and f["rank_forward_backward_ms"] == [20.0, 21.0]
    assert f["rank_comm_wait_ms"] == [4.0, 0.0] and f["rank_optimizer_ms"] == [2.0, 2.0]
    assert f["rank_step_ms"] == [23.0, 53.0]  # busy time: communication wait is waiting for the others
    assert rt.unpack(rt.slots(0, 2, None).tolist(), 2) is None  # a step that closed no interval


def test_a_slow_rank_is_named_after_three_intervals_with_its_dominant_part():
    watch = rt.StragglerWatch()
    slow = figures([[0.001, 0.02, 0.03, 0.002], [0.001, 0.02, 0.03, 0.002], [0.038, 0.02, 0.0, 0.002]])
    seen = [watch.check(slow) for _ in range(4)]
    assert seen[0] == seen[1] == (None, None)
    rank, message = seen[2]
    assert rank == 2 and message.startswith("rank 2 is ") and "slower than the median: data wait 38 ms/step" in message
    assert "--workers" in message
    assert seen[3] == (2, None)  # named once, still flagged in the metrics
    even = figures([[0.001, 0.02, 0.0, 0.002]] * 3)
    assert watch.check(even) == (None, None)
    assert [watch.check(slow)[1] is not None for _ in range(3)] == [False, False, True]  # a new episode


def test_compute_straggler_and_one_rank():
    watch = rt.StragglerWatch()
    f = figures([[0.001, 0.020, 0.02, 0.002], [0.001, 0.040, 0.0, 0.002]])
    message = [watch.check(f) for _ in range(3)][-1][1]
    assert message.startswith("rank 1 is ") and "forward+backward 40 ms/step" in message
    assert rt.StragglerWatch().check(figures([[0.05, 0.02, 0.0, 0.002]])) == (None, None)


def test_cpu_clocks_split_a_step_and_restart_at_each_snapshot():
    t = rt.RankTimes(torch.device("cpu"))
    for _ in range(3):
        t.data_waited(0.005)
        t.grads_ready()
        t.backward_done()
        t.step_end()
    t.data_waited(0.007)  # the interval's last step: its data wait is in, the rest goes to the next one
    data, fb, comm, opt, steps = t.snapshot()
    assert steps == 4 and abs(data - 0.0055) < 1e-9 and fb >= 0 and comm >= 0 and opt >= 0
    t.backward_done()  # no DDP hook: no communication wait
    t.step_end()
    assert t.snapshot()[2] == 0.0 and t.snapshot() == [0.0, 0.0, 0.0, 0.0, 0.0]


def test_the_slow_data_switch_is_off_unless_set(monkeypatch):
    batches = iter([1, 2])
    monkeypatch.delenv(rt.TEST_DELAY_ENV, raising=False)
    assert rt.delayed_for_test(batches, 0) is batches
    monkeypatch.setenv(rt.TEST_DELAY_ENV, "1:0")
    assert rt.delayed_for_test(batches, 0) is batches
    assert list(rt.delayed_for_test(batches, 1)) == [1, 2]


def test_report_breakdown_leaves_out_the_first_interval():
    rec = lambda v: {f"rank_{p}_ms": [v, 2 * v] for p in rt.PARTS}  # noqa: E731
    b = rank_breakdown([rec(100.0), rec(1.0), rec(3.0)])
    assert b["data_wait"] == [2.0, 4.0] and set(b) == set(rt.PARTS)
    assert rank_breakdown([{"step": 1, "loss": 2.0}]) is None


def test_rank_scalars_name_every_rank():
    rec = {"step": 4, "loss": 1.0, "rank_data_wait_ms": [1.0, 2.0], "rank_step_ms": [3.0, 4.0]}
    assert rt.rank_scalars(rec) == {
        "rank/0/data_wait_ms": 1.0,
        "rank/1/data_wait_ms": 2.0,
        "rank/0/step_ms": 3.0,
        "rank/1/step_ms": 4.0,
    }
