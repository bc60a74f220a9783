"""train.py, but rank FAIL_RANK dies at optimizer step FAIL_STEP: a real mid-training crash of one rank.

FAIL_MODE=raise (default) raises an exception; FAIL_MODE=kill sends itself SIGKILL; FAIL_MODE=stop sends
itself SIGSTOP (a hung rank: alive, silent, until the launcher kills it). Only the first
attempt fails (TORCHELASTIC_RESTART_COUNT 0 or unset), so restarts and resumes can finish.
"""

import os
import signal

from dist_cnn.commands import entry
from dist_cnn.train import trainer

_step = trainer.Trainer.train_step


def failing_step(self, micro):
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if first_attempt and self.env.rank == int(os.environ["FAIL_RANK"]) and self.step == int(os.environ["FAIL_STEP"]):
        mode = os.environ.get("FAIL_MODE", "raise")
        if mode in ("kill", "stop"):
            os.kill(os.getpid(), signal.SIGKILL if mode == "kill" else signal.SIGSTOP)
        raise RuntimeError(f"injected failure on rank {self.env.rank} at step {self.step}")
    return _step(self, micro)


trainer.Trainer.train_step = failing_step
entry()
