"""The sweep's loop: ask the study for a trial, write its files, launch it, and tell the study how it
ended, K trials at a time, until the study holds the spec's number of finished trials.

Only the driver asks and tells, and only after the trial's files say how it ended, so a driver killed
at any moment and started again loses nothing: a trial still RUNNING in the study is resumed with its
own config file (same number, same values) or, when its run directory already says how it ended,
told so without running again.
"""

from __future__ import annotations

import logging
import signal
import time

from dist_cnn.sweep import study as study_mod
from dist_cnn.sweep.spec import Spec
from dist_cnn.sweep.trialfiles import TrialFiles, error_line, outcome, trial_config, write_trial

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0


class Driver:
    def __init__(self, out, spec: Spec, study, record: dict, launcher, max_failures: int):
        self.out, self.spec, self.study, self.record = out, spec, study, record
        self.launcher, self.max_failures = launcher, max_failures
        self.running: dict[int, object] = {}  # trial number -> its launched run
        self.interrupted = 0

    # ---- study state ------------------------------------------------------------------------
    def _trials(self, *states):
        return self.study.get_trials(deepcopy=False, states=states or None)

    def _finished(self) -> int:
        import optuna

        S = optuna.trial.TrialState
        return len(self._trials(S.COMPLETE, S.PRUNED, S.FAIL))

    def _failures(self) -> int:
        import optuna

        return len(self._trials(optuna.trial.TrialState.FAIL))

    # ---- one trial --------------------------------------------------------------------------
    def _files(self, trial) -> TrialFiles:
        return TrialFiles(self.out, trial.number)

    def _prepare(self, trial) -> TrialFiles:
        """The trial's config and link files (already there for a trial that is resumed)."""
        files = self._files(trial)
        cfg = trial_config(self.spec.base, trial.params, files, self.record["name"])
        link = {
            "storage": self.record["storage"],
            "study": self.record["name"],
            "trial_id": trial._trial_id,
            "number": trial.number,
            "objective": self.spec.objective,
            "pruner": self.spec.pruner,
            "params": trial.params,
        }
        write_trial(files, cfg, link)
        return files

    def _decided(self, trial):
        """The trial with a value for every option: the sampler decides the ones it has not yet (a
        driver killed between asking and suggesting left them out); decided values stay as they are."""
        import optuna

        live = trial if isinstance(trial, optuna.trial.Trial) else optuna.trial.Trial(self.study, trial._trial_id)
        for d in self.spec.space:
            study_mod.suggest(live, d)
        return self.study._storage.get_trial(live._trial_id)  # a FrozenTrial: number, params, id

    def _new_trial(self):
        return self._decided(self.study.ask())

    def _launch(self, trial, resumed: bool) -> None:
        files = self._prepare(trial)
        self.running[trial.number] = self.launcher.launch(files)
        how = "resumed" if resumed else "started"
        log.info(f"trial {trial.number} {how}: {_params_text(trial.params)}  ({files.run_dir})")

    def _tell(self, number: int, code: int | None) -> None:
        """Tell the study how a trial whose run ended did; its files say which."""
        import optuna

        S = optuna.trial.TrialState
        files = TrialFiles(self.out, number)
        state, data = outcome(files)
        if state == "complete":
            value = data[self.spec.objective]
            self.study.tell(number, value)
            log.info(f"trial {number} complete: {self.spec.objective} {value:.6g}")
        elif state == "pruned":
            self.study.tell(number, state=S.PRUNED)
            log.info(f"trial {number} pruned at step {data['step']}")
        else:
            how = f"exited with code {code}" if code else "ended"
            err = error_line(files, f"the run {how} without a result")
            trial_id = self._trials_by_number()[number]._trial_id
            optuna.trial.Trial(self.study, trial_id).set_user_attr("error", err)
            self.study.tell(number, state=S.FAIL)
            log.info(f"trial {number} failed: {err}")

    def _trials_by_number(self) -> dict:
        return {t.number: t for t in self._trials()}

    # ---- the loop ---------------------------------------------------------------------------
    def _resume_running(self) -> list:
        """Trials the study has as RUNNING but no process of this driver runs: a previous driver's.
        Their jobs (SLURM) are attached; the ones that ended are told; the rest are relaunched."""
        import optuna

        pending = []
        for trial in self._trials(optuna.trial.TrialState.RUNNING):
            if trial.number in self.running:
                continue
            files = self._files(trial)
            job = self.launcher.attach(files)
            if job is not None:
                self.running[trial.number] = job
                log.info(f"trial {trial.number}: found its job {getattr(job, 'job', '')} still queued or running")
            elif outcome(files)[0] != "unfinished" or (files.job.is_file() and files.config.is_file()):
                self._tell(trial.number, None)  # it ended while no driver watched it
            else:
                pending.append(self._decided(trial))
        return pending

    def _reap(self) -> None:
        for number, run in list(self.running.items()):
            code = run.poll()
            if code is None:
                continue
            del self.running[number]
            self.launcher.release(run)
            if self.interrupted:
                continue  # stopped by us: it stays RUNNING and resumes next time
            self._tell(number, code)

    def _on_signal(self, signum, frame):
        self.interrupted = signum
        for run in self.running.values():
            run.stop()

    def run(self) -> int:
        """0 when the sweep holds its trials; 1 when --max-failures ended it; 128 + signal when stopped."""
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._on_signal)
        pending = self._resume_running()
        while True:
            self._reap()
            if self.interrupted:
                if not self.running or self.launcher.detached:  # SLURM jobs go on; the next driver finds them
                    log.info("sweep stopped; the same command continues it (running trials resume)")
                    return 128 + self.interrupted
            elif self.max_failures and self._failures() >= self.max_failures:
                if not self.running:
                    why = f"{self._failures()} trials failed (--max-failures {self.max_failures})"
                    log.info(f"sweep ended: {why}")
                    return 1
            else:
                started = self._finished() + len(self.running) + len(pending)
                while len(self.running) < self.launcher.capacity and (pending or started < self.spec.trials):
                    if pending:
                        self._launch(pending.pop(0), resumed=True)
                    else:
                        self._launch(self._new_trial(), resumed=False)
                        started += 1
                if not self.running:
                    log.info(f"sweep complete: {self._finished()} trials")
                    return 0
            time.sleep(POLL_SECONDS)


def _params_text(params: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
