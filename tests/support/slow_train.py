"""train.py with a fixed sleep (STEP_SLEEP seconds) in every optimizer step, so that a short run lasts
long enough to be interrupted (a killed node, a signal) while it trains; with STEP_GATE, every step
first waits for that file to exist (a run held at its first step until the test lets it go)."""

import os
import time
from pathlib import Path

from dist_cnn.commands import entry
from dist_cnn.train import trainer

_step = trainer.Trainer.train_step


def wait_for_gate(path: Path, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def slow_step(self, micro):
    if "STEP_GATE" in os.environ:
        wait_for_gate(Path(os.environ["STEP_GATE"]))
    time.sleep(float(os.environ.get("STEP_SLEEP", "0.3")))
    return _step(self, micro)


trainer.Trainer.train_step = slow_step
entry()
