"""train.py, but rank FAIL_RANK raises at optimizer step FAIL_STEP: a real mid-training crash of one rank."""
import os
import sys

from dist_cnn import trainer
from dist_cnn.cli import main

_step = trainer.Trainer.train_step


def failing_step(self, micro):
    if self.env.rank == int(os.environ["FAIL_RANK"]) and self.step == int(os.environ["FAIL_STEP"]):
        raise RuntimeError(f"injected failure on rank {self.env.rank} at step {self.step}")
    return _step(self, micro)


trainer.Trainer.train_step = failing_step
sys.exit(main())
