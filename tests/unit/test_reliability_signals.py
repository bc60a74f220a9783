"""Stop signals: evaluation is cut short at the next batch; Ctrl-C checkpoints first, aborts second."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from dist_cnn.data.loader import Normalize
from dist_cnn.distributed.preempt import StopSignal
from dist_cnn.distributed.process_group import DistEnv
from dist_cnn.train.evaluate import evaluate


def small_eval(should_stop, n=5000, batch=100):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 10))
    x = torch.randint(0, 255, (n, 3, 4, 4), dtype=torch.uint8)
    y = torch.randint(0, 10, (n,))
    return evaluate(
        model,
        x,
        y,
        num_classes=10,
        normalize=Normalize([0.5] * 3, [0.5] * 3, "cpu", False),
        env=DistEnv(),
        precision="fp32",
        batch_size=batch,
        should_stop=should_stop,
    )


def test_evaluation_stops_at_the_next_batch_once_a_stop_is_requested():
    asked = []

    def stop():
        asked.append(1)
        return len(asked) >= 3

    assert small_eval(stop) is None
    assert len(asked) == 3  # two batches scored, then the vote said stop


def test_evaluation_without_a_stop_is_complete_and_exact():
    res = small_eval(lambda: False, n=1234, batch=100)
    assert res["test_total"] == 1234 and sum(map(sum, res["confusion_matrix"])) == 1234


@pytest.fixture
def restore_handlers():
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, h in saved.items():
        signal.signal(s, signal.SIG_DFL if h is None else h)  # None: a handler set outside Python


def test_first_ctrl_c_requests_a_checkpoint_and_says_so_second_aborts(restore_handlers, capfd):
    stop = StopSignal()
    stop.install()
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.requested and not stop.wants_requeue and stop.exit_code == 130
    err = capfd.readouterr().err
    assert "checkpoint" in err and "Ctrl-C again" in err
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)


def test_sigterm_is_an_unfinished_exit_code(restore_handlers):
    stop = StopSignal()
    stop.install()
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.requested and stop.exit_code == 143
