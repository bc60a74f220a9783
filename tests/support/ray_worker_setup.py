"""Ray's worker_process_setup_hook for tests/support/ray_driver.py: every optimizer step sleeps
STEP_SLEEP seconds (a short run lasts long enough to be interrupted), and each training worker writes
PID_DIR/rank<R>-<PID> at its first step."""

import os
import time
from pathlib import Path


def setup() -> None:
    from dist_cnn.train import trainer

    step = trainer.Trainer.train_step

    def slow_step(self, micro):
        pid_dir = os.environ.get("PID_DIR")
        if pid_dir and not getattr(self, "_pid_written", False):
            Path(pid_dir, f"rank{self.env.rank}-{os.getpid()}").touch()
            self._pid_written = True
        time.sleep(float(os.environ.get("STEP_SLEEP", "0")))
        return step(self, micro)

    trainer.Trainer.train_step = slow_step
