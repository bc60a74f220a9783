"""train.py with a fixed sleep (STEP_SLEEP seconds) in every optimizer step, so that a short run lasts
long enough to be interrupted (a killed node, a signal) while it trains."""

import os
import time

from dist_cnn.commands import entry
from dist_cnn.train import trainer

_step = trainer.Trainer.train_step


def slow_step(self, micro):
    time.sleep(float(os.environ.get("STEP_SLEEP", "0.3")))
    return _step(self, micro)


trainer.Trainer.train_step = slow_step
entry()
