"""The run's side of a sweep: present only when the sweep driver started the run as one of its trials
(DIST_CNN_SWEEP_TRIAL names the trial's link file, trials/NNNN.json).

At the start every rank's values of the searched options are gathered and compared with the trial's:
a rank that trains with other values is an error before the first step. After each evaluation rank 0
reports the objective to the study and asks its pruner whether to go on; the trainer turns a "stop"
into the ranks' usual stop agreement, so all ranks stop at the same step.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from dist_cnn.config import Config
from dist_cnn.distributed.process_group import DistEnv
from dist_cnn.errors import UserError, one_line
from dist_cnn.sweep import study as study_mod
from dist_cnn.sweep.trialfiles import TRIAL_ENV

log = logging.getLogger(__name__)


def option(cfg: Config, key: str):
    section, name = key.split(".", 1)
    return getattr(getattr(cfg, section), name)


class TrialReporter:
    def __init__(self, link: dict, env: DistEnv, ranks: list[dict]):
        self.link, self.env = link, env
        self.ranks = ranks  # each rank's values of the searched options, checked equal to the trial's
        self.objective, self.number = link["objective"], link["number"]
        self._trial = None  # the Optuna trial, opened by rank 0 at its first report

    @classmethod
    def from_environ(cls, cfg: Config, env: DistEnv, environ=os.environ) -> TrialReporter | None:
        """None outside a sweep; in one, the trial's reporter once every rank's values are checked."""
        path = environ.get(TRIAL_ENV)
        if not path:
            return None
        link = json.loads(Path(path).read_text())
        mine = {key: option(cfg, key) for key in link["params"]}
        every = [mine]
        if env.initialized:
            every = [None] * env.world_size
            torch.distributed.all_gather_object(every, mine)
        bad = [rank for rank, values in enumerate(every) if values != link["params"]]
        if bad:
            raise UserError(
                f"sweep trial {link['number']}: rank {bad[0]} trains with {every[bad[0]]}, "
                f"not the trial's {link['params']}"
            )
        return cls(link, env, every)

    def start_event(self) -> dict:
        """The metrics.jsonl record of this trial: its study, number, values, and each rank's values."""
        return {
            "event": "trial",
            "study": self.link["study"],
            "number": self.number,
            "params": self.link["params"],
            "ranks": self.ranks,
        }

    def _open(self):
        import optuna

        study_mod.quiet()
        study = optuna.load_study(
            study_name=self.link["study"],
            storage=study_mod.storage(self.link["storage"]),
            pruner=study_mod.pruner(self.link["pruner"]),
        )
        return optuna.trial.Trial(study, self.link["trial_id"])

    def should_prune(self, record: dict, last: bool) -> bool:
        """Rank 0, after an evaluation: report it; True when the pruner stops the trial here (never
        after the last evaluation: the run is complete). A study that cannot be reached is a warning,
        not the end of the run."""
        value = record.get(self.objective)
        if not self.env.is_rank0 or value is None:
            return False
        try:
            self._trial = self._trial or self._open()
            self._trial.report(float(value), record["step"])
            return not last and self._trial.should_prune()
        except Exception as e:  # the storage is another process's file or server
            log.warning(f"warning: sweep trial {self.number}: could not report to the study ({one_line(e)})")
            return False
