"""train.py whose rank STUCK_RANK stops in its data loader at step STUCK_STEP (it waits there for
STUCK_SECONDS): a rank that falls behind while the others wait in a collective (the hang report)."""

import os
import time

from dist_cnn.commands import entry
from dist_cnn.train import trainer

_batches = trainer.Trainer._batches
RANK, STEP = int(os.environ.get("STUCK_RANK", "1")), int(os.environ.get("STUCK_STEP", "3"))


def stuck_batches(self):
    batches = _batches(self)

    def wrapped():
        for batch in batches:
            if self.env.rank == RANK and self.step + 1 == STEP:
                time.sleep(float(os.environ.get("STUCK_SECONDS", "120")))  # the stuck read itself
            yield batch

    return wrapped()


trainer.Trainer._batches = stuck_batches
entry()
