"""The trainer: composes data, model, DDP, optimizer, checkpoints and metrics into one loop.

Every rank runs the same code and takes part in every collective; only rank 0 writes or prints
(the run directory, metrics, W&B and the progress bar are no-ops elsewhere).
"""

from __future__ import annotations

import contextlib
import logging
import random
import resource
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from dist_cnn import config as config_mod
from dist_cnn.config import Config
from dist_cnn.data.augment import BatchMix, ImageAugment
from dist_cnn.data.loader import Augment
from dist_cnn.data.open import open_source
from dist_cnn.data.source import DataSource, upgrade_stored_config
from dist_cnn.data.stream import default_workers
from dist_cnn.distributed import parallel, process_group
from dist_cnn.distributed.preempt import StopSignal, requeue_slurm_job
from dist_cnn.errors import PeerFailed, TrainingFailed, UserError, one_line
from dist_cnn.fileio import WritePolicy, write_json_atomic
from dist_cnn.models.checks import check_trainable
from dist_cnn.models.prepare import prepare_model
from dist_cnn.models.trust import check_file_spec
from dist_cnn.observability import console, hang, phases
from dist_cnn.observability.metrics import MetricsLog
from dist_cnn.observability.phases import PHASES
from dist_cnn.observability.progress import Progress, RateAverage
from dist_cnn.observability.rank_times import RankTimes, StragglerWatch, delayed_for_test, slots, unpack
from dist_cnn.observability.report import format_report, write_plots
from dist_cnn.observability.reporter import Reporter
from dist_cnn.observability.tensorboard_logger import TensorBoardLogger
from dist_cnn.observability.wandb_logger import WandbLogger
from dist_cnn.sweep.reporter import TrialReporter
from dist_cnn.train import checkpoint, precision
from dist_cnn.train.allocator import tune_malloc
from dist_cnn.train.checkpoint import CheckpointPolicy
from dist_cnn.train.ema import ModelEMA, adjusted_decay
from dist_cnn.train.evaluate import evaluate_source
from dist_cnn.train.optim import Lookahead, advance, build_optimizer, build_schedule, total_steps, use_fused
from dist_cnn.train.profiling import StepProfiler
from dist_cnn.train.resume_rules import reconcile
from dist_cnn.train.rundir import prepare_run_dir, resolve_resume
from dist_cnn.train.state import export_components, training_components
from dist_cnn.train.whiten_freeze import WhitenBiasFreeze

log = logging.getLogger(__name__)


class StepSignals(NamedTuple):
    """What all ranks agreed on after a step: one small all_reduce (the step's vote, on the steps
    parallel.VoteCadence picks) carries all four, every rank's step time for planning the next vote,
    and at the end of a log interval every rank's time accounting (rank_times). On the CPU `nonfinite`
    is also found in the reduced gradients, the same on every rank, on every step."""

    nonfinite: bool  # some rank's loss (or the reduced gradients) was NaN/Inf: the step is not applied
    stop: bool  # some rank got a stop signal: checkpoint and leave
    checkpoint_due: bool  # rank 0's clock says a periodic checkpoint is due
    write_failed: bool  # rank 0 could not write the run directory and --on-write-error is stop


class Meter:
    """Training time: the clock runs while training and is paused around evaluation and checkpoints."""

    def __init__(self, seconds: float = 0.0):
        self.seconds, self._since = seconds, None

    def start(self) -> None:
        self._since = time.perf_counter()

    def pause(self) -> None:
        if self._since is not None:
            self.seconds += time.perf_counter() - self._since
            self._since = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Trainer:
    """Build everything from the config, then fit(). `data` skips loading (benchmarks, the Python API);
    `model_factory` builds the model instead of `cfg.model.name` (the Python API); `reporter` hears
    the metrics and checkpoints (an engine such as Ray Train)."""

    def __init__(
        self,
        cfg: Config,
        env: process_group.DistEnv,
        data: DataSource | None = None,
        model_factory=None,
        reporter: Reporter | None = None,
    ):
        self.cfg, self.env = cfg, env
        self.reporter = reporter or Reporter()
        t, rank0 = cfg.train, env.is_rank0
        micro_world = env.world_size * t.grad_accum
        if t.batch_size % micro_world:
            raise UserError(f"--batch-size {t.batch_size} must divide by world size x grad accum = {micro_world}")
        self.batch_per_rank = t.batch_size // micro_world
        if t.precision == "fp16" and env.device.type == "cpu":
            raise UserError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
        seed_everything(t.seed)

        # The run directory and the checkpoint to resume are settled before the data is loaded: a
        # directory in use, foreign or read-only, or a file that is no checkpoint, fails at once.
        self.run_dir = process_group.rank0_only(env, lambda: prepare_run_dir(cfg))
        self.reporter.run_dir_ready(self.run_dir, rank0)
        self.heartbeat = hang.start(process_group.store(), env.rank, env.world_size, self.run_dir)
        self.resume_path, state = resolve_resume(cfg, env, self.run_dir)
        if state is not None:
            self._resume_config(state)
            self.batch_per_rank = t.batch_size // micro_world
            if t.batch_size % micro_world:
                raise UserError(f"--batch-size {t.batch_size} must divide by world size x grad accum = {micro_world}")
            seed_everything(t.seed)
        if state is not None and "eval_resize" not in state["config"].get("data", {}):
            # a run from before the recipe options resumes with the recipe its loader gave it
            legacy = upgrade_stored_config(state["config"].get("data", {}), state.get("loader"))
            cfg.data.train_crop, cfg.data.eval_resize = legacy["train_crop"], legacy["eval_resize"]
        self.loader_note = ""  # why auto chose the pipeline it chose, for the first log line
        self.data = data or self._load_data()

        prepared = prepare_model(cfg, self.data, env.device, factory=model_factory, starting_weights=state is None)
        self.normalize, self.mean, self.std = prepared.normalize, prepared.mean, prepared.std
        check_trainable(prepared.model, self.batch_per_rank, cfg.model.sync_bn and env.world_size > 1)
        self.rank_times, self.stragglers, self.rank_figures = RankTimes(env.device), StragglerWatch(), None
        self.model, self.raw_model = parallel.wrap(
            prepared.model, env, cfg.model, t.grad_accum, on_grads_ready=self.rank_times.grads_ready
        )
        self.params = list(self.raw_model.parameters())  # read every step (clipping, the non-finite check)
        # A resumed run keeps the precision it started with, whatever `auto` would measure now.
        self.precision, self.precision_reason = (
            (state["precision"], "kept from the checkpoint")
            if state and t.precision == "auto"
            else process_group.rank0_only(env, self._resolve_precision)
        )
        self.optimizer = build_optimizer(self.model, cfg.optim, env.device, use_fused(env.device))
        # fused SGD skips a non-finite step in its kernel (found_inf), with no host sync; foreach on the host
        self.skip_on_device = bool(self.optimizer.defaults.get("fused"))
        self.cadence = parallel.VoteCadence(every_step=env.device.type == "cuda", log_every=t.log_every)
        self.pipeline = self._build_pipeline()
        self.steps_per_epoch = self.pipeline.steps_per_epoch // t.grad_accum
        if self.steps_per_epoch == 0:
            raise UserError(f"--batch-size {t.batch_size} is larger than the training set ({self.data.train_size})")
        self.total_steps = total_steps(t.epochs, self.steps_per_epoch, t.max_steps)
        self.schedule = build_schedule(self.optimizer, self.total_steps, cfg.optim)
        self.scaler = precision.grad_scaler(self.precision, env.device)
        self.lookahead = (
            Lookahead(self.raw_model, t.lookahead_every, t.lookahead_decay, self.total_steps)
            if t.lookahead_every
            else None
        )
        ema_decay = adjusted_decay(t.model_ema_decay, t.batch_size, t.model_ema_steps, t.epochs)
        self.ema = (
            ModelEMA(
                self.raw_model, ema_decay, t.model_ema_steps, warmup_steps=int(cfg.optim.warmup * self.total_steps)
            )
            if t.model_ema
            else None
        )
        self.whiten_freeze = WhitenBiasFreeze(
            self.raw_model, cfg.model.freeze_whiten_bias_after, ddp=parallel.ddp_of(self.model) is not None
        )
        self.mix = BatchMix(cfg.data.mixup_alpha, cfg.data.cutmix_alpha, self.data.num_classes, t.seed, env.rank)
        self.best_weights = "model"  # which weights best.pt holds the best score of: model or ema

        self.step, self.epoch, self.epoch_step = 0, 0, 0
        self.skipped_images: set[str] = set()  # unreadable files found so far (--skip-bad-images)
        self._live_batches, self._batches_at = None, None
        self.meter, self.best_acc, self.bad_steps, self.skipped_steps = Meter(), -1.0, 0, 0
        self.rate = RateAverage()
        self.ckpt_policy = CheckpointPolicy(cfg.ckpt)
        self.writes = WritePolicy(cfg.ckpt.on_write_error)
        self.metrics = MetricsLog(self.run_dir, rank0, on_error=self.writes.failed)
        self.wandb_id = None
        if state is not None:
            self._load_state(state)
        self.progress = Progress(rank0, cfg.log.progress, self.total_steps)
        self.wandb = WandbLogger(cfg.log, self.run_dir, config_mod.to_dict(cfg), self.wandb_id, rank0)
        self.tensorboard = TensorBoardLogger(
            self.run_dir, rank0 and cfg.log.tensorboard, self.step if state is not None else None
        )
        self.stop = StopSignal(announce=rank0)
        self.stop.install()
        self.trial = TrialReporter.from_environ(cfg, env)  # None unless a sweep started the run
        self.profiler = StepProfiler(cfg.log.profile, self.run_dir, env.rank, env.device, cfg.log.profile_stack)

    # ---- setup -------------------------------------------------------------------------------
    def _same_run(self, state: dict) -> bool:
        """The checkpoint is this run's: it lies in this run directory, or was written for it (a copy an
        engine such as Ray Train keeps elsewhere records the run's --out)."""
        here = self.run_dir.resolve()
        recorded = (state.get("config") or {}).get("log", {}).get("out")
        return self.resume_path.resolve().parent.parent == here or (
            isinstance(recorded, str) and bool(recorded) and Path(recorded).resolve() == here
        )

    def _resume_config(self, state: dict) -> None:
        """The resumed run's options: the checkpoint's, except those that may change (resume_rules)."""
        cfg = self.cfg
        if not isinstance(state.get("config"), dict):
            raise UserError(f"{self.resume_path} holds no config")
        given = config_mod.given_keys(cfg)
        resolved = {"train.precision": state.get("precision"), "data.loader": state.get("loader")}
        reconcile(cfg, state["config"], given, resolved)
        if "model.name" not in given:  # the model is the file's: it may import code only if allowed
            check_file_spec(cfg.model.name, str(self.resume_path), trust=config_mod.trusts_model_code(cfg))
        config_mod.validate(cfg)  # a file's values meet the same rules as flags

    def _load_data(self) -> DataSource:
        """The source the config names (data.open_source: in memory or streamed, and why)."""
        source, self.loader_note = open_source(self.cfg.data, self.env, timeout=self.cfg.dist.timeout)
        return source

    @property
    def train_size(self) -> int:
        return self.data.train_size

    def _resolve_precision(self) -> tuple[str, str]:
        """(precision, why); `auto` is a rule from the hardware, or a measurement cached per machine,
        model, input and batch, so the same command resolves the same way every time."""
        if self.cfg.train.precision != "auto":
            return self.cfg.train.precision, "as asked"
        x, y = self.data.probe(min(self.batch_per_rank, 64), self.cfg.train.seed)
        x, y = self.normalize(x.to(self.env.device)), y.to(self.env.device)
        n = len(x)
        probe = precision.time_training_step(self.raw_model, x, y)
        what = {
            "model": self.cfg.model.name,
            "input": list(x.shape[1:]),
            "batch": n,
            "channels_last": self.cfg.model.channels_last,
        }
        return precision.resolve_auto(self.env.device, what, probe)

    def _build_pipeline(self):
        cfg, env = self.cfg, self.env
        pipeline = self.data.train_batches(
            loader=cfg.data.loader,
            batch_per_rank=self.batch_per_rank,
            rank=env.rank,
            world=env.world_size,
            seed=cfg.train.seed,
            aug=Augment(cfg.data.crop_padding, cfg.data.flip, cfg.data.alternate_flip),
            image_aug=ImageAugment(cfg.data.auto_augment, cfg.data.random_erase, cfg.train.seed, self.mean),
            normalize=self.normalize,
            device=env.device,
            workers=default_workers(cfg.data.workers),
        )
        self.loader_kind = pipeline.kind
        return pipeline

    # ---- checkpoint state --------------------------------------------------------------------
    def _load_state(self, s: dict) -> None:
        checkpoint.check_compatible(
            s,
            self.cfg.model.name,
            self.cfg.data.dataset,
            {k: tuple(v.shape) for k, v in self.raw_model.state_dict().items()},
        )
        checkpoint.check_resumable(
            s,
            batch_size=self.cfg.train.batch_size,
            train_size=self.train_size,
            steps_per_epoch=self.steps_per_epoch,
            total_steps=self.total_steps,
            epochs=self.cfg.train.epochs,
        )
        checkpoint.restore(s, training_components(self))
        if not self._same_run(s):
            # another run's checkpoint into a new --out: that run's W&B run stays its own
            self.wandb_id = None
            log.info(f"resuming {self.resume_path} into a new --out {self.run_dir}: a new W&B run")
        checkpoint.scrub_missing(self.metrics.history)  # events naming checkpoints pruned since
        self.metrics.rewrite()
        self.metrics.write({"event": "resume", "step": self.step, "epoch": self.epoch, "from": str(self.resume_path)})
        log.info(
            f"resumed from {self.resume_path} at step {self.step} (epoch {self.epoch + 1}, "
            f"step {self.epoch_step} of {self.steps_per_epoch})"
        )

    def save_checkpoint(self, is_best: bool = False, final: bool = False, summary: dict | None = None) -> None:
        """All ranks call this (RNG states are gathered); rank 0 writes while the others wait. The final
        checkpoint is reported with the run's summary."""
        with PHASES.during(phases.CHECKPOINT):
            self._save_checkpoint(is_best, final, summary)

    def _save_checkpoint(self, is_best: bool, final: bool, summary: dict | None) -> None:
        saved = checkpoint.assemble(training_components(self, finished=final))
        err, path = None, None
        if self.env.is_rank0:
            try:
                path, pruned = checkpoint.write(self.run_dir, saved, self.cfg.ckpt.keep, is_best)
            except OSError as e:  # torch.save's own write errors arrive as OSError too (fileio)
                err = f"checkpoint write failed at step {self.step} ({e.strerror or e}); the previous one is intact"
                log.warning(f"warning: {err}")
            else:
                self.metrics.write({"event": "checkpoint", "step": self.step, "path": str(path)})
                if pruned and checkpoint.scrub_missing(self.metrics.history):
                    self.metrics.rewrite()  # metrics.jsonl never names a checkpoint that is gone
        err = process_group.broadcast_object(err, self.env)
        self.reporter.checkpoint(
            path, {"event": "checkpoint", "step": self.step, "epoch": self.epoch, "final": final, **(summary or {})}
        )
        if err and self.cfg.ckpt.on_write_error == "stop":
            raise TrainingFailed(err) if self.env.is_rank0 else PeerFailed(err)
        self._raise_if_write_failed(process_group.broadcast_object(self.writes.pending, self.env))
        self.ckpt_policy.written()

    def _raise_if_write_failed(self, pending: str | None) -> None:
        """All ranks call this with the same answer (agreed on by a collective)."""
        if pending:
            raise TrainingFailed(pending) if self.env.is_rank0 else PeerFailed(pending)

    # ---- training ----------------------------------------------------------------------------
    def train_step(self, micro_batches) -> tuple[StepSignals, torch.Tensor]:
        """One optimizer step over grad_accum micro-batches; returns what all ranks agreed on, and the loss."""
        model, accum, ddp = self.model, len(micro_batches), parallel.ddp_of(self.model)
        loss_sum = None
        votes = self.cadence.due(self.step, self.total_steps)
        for i, (x, y) in enumerate(micro_batches):
            last = i == accum - 1
            with contextlib.nullcontext() if last or ddp is None else ddp.no_sync():
                PHASES.enter(phases.FORWARD)
                with self.profiler.region("forward"), precision.autocast(self.precision, self.env.device):
                    loss = F.cross_entropy(model(x), y, label_smoothing=self.cfg.optim.label_smoothing)
                    if accum > 1:
                        loss = loss / accum
                part = loss.detach().float()
                loss_sum = part if loss_sum is None else loss_sum + part
                if not self.cadence.every_step:  # a bad loss must show in the gradients every rank gets
                    loss = parallel.poisoned(loss)
                if last:  # the loss is known before the backward pass: agree while it runs
                    vote = self._start_step_vote(loss_sum) if votes else None
                PHASES.enter(phases.BACKWARD)
                with self.profiler.region("backward"):
                    self.scaler.scale(loss).backward()
        self.rank_times.backward_done()
        self.whiten_freeze.after_backward()
        norm = None
        if self.cfg.optim.clip_grad_norm:  # on the true gradients: unscaled from fp16's loss scale first
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.optim.clip_grad_norm)
        PHASES.enter(phases.OPTIMIZER)
        with self.profiler.region("optimizer"):
            signals = self._step_unless_nonfinite(vote, norm)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            advance(self.schedule)
        return signals, loss_sum

    def _step_unless_nonfinite(self, vote: parallel.StepVote | None, norm: torch.Tensor | None) -> StepSignals:
        """The optimizer step, unless some rank's loss (on the CPU: the reduced gradients) was non-finite.
        fp16 runs on CUDA only; the optimizer is fused where torch has the kernel (use_fused)."""
        if self.precision == "fp16":  # the scaler skips non-finite steps by itself
            self.scaler.step(self.optimizer)
            return self._signals(vote)
        if self.skip_on_device and self.cadence.every_step:
            # fused SGD skips the update on the device when found_inf is 1: no host sync for the guard,
            # and the flags are read after the step is queued (from pinned memory, see StepVote)
            self.optimizer.found_inf = vote.on_device()[:1]
            self.optimizer.step()
            del self.optimizer.found_inf
            return self._signals(vote)
        signals = StepSignals(False, False, False, False)
        if vote is not None:
            with PHASES.during(phases.STEP_ALL_REDUCE):
                signals = self._signals(vote)  # long done: it ran alongside the backward pass
        if not self.cadence.every_step and parallel.grads_nonfinite(self.params, norm):
            signals = signals._replace(nonfinite=True)
        if self.skip_on_device:  # fused on the CPU: the kernel's own skip, as on CUDA
            self.optimizer.found_inf = torch.tensor([float(signals.nonfinite)])
            self.optimizer.step()
            del self.optimizer.found_inf
        elif not signals.nonfinite:
            self.optimizer.step()
        return signals

    def _signals(self, vote: parallel.StepVote) -> StepSignals:
        """The agreed flags; every rank's time accounting when the step closed a log interval."""
        values = vote.values()
        n = len(StepSignals._fields)
        self.cadence.voted(self.step, values[n], time.perf_counter())
        figures = unpack(values[n + 1 :], self.env.world_size)
        if figures is not None:
            self.rank_figures = figures
        return StepSignals(*(v > 0 for v in values[:n]))

    def _start_step_vote(self, loss: torch.Tensor) -> parallel.StepVote:
        """One small all_reduce (max) a step carries everything the ranks must decide together; it is
        started before the backward pass and read after it."""
        due = self.env.is_rank0 and self.ckpt_policy.clock_due()
        host = torch.tensor(
            [
                float(self.stop.requested),
                float(due),
                float(self.writes.pending is not None),
                self.cadence.mean_step_seconds(time.perf_counter()),
            ]
        )
        closing = self.cadence.closes_interval(self.step, self.total_steps)
        figures = self.rank_times.snapshot() if closing else None  # this interval's, to rank 0
        host = torch.cat([host, slots(self.env.rank, self.env.world_size, figures)])
        if loss.is_cuda:  # from pinned memory: an asynchronous copy, no wait for the GPU
            host = host.pin_memory().to(loss.device, non_blocking=True)
        return parallel.StepVote(torch.cat([(~torch.isfinite(loss)).float().view(1), host]))

    def fit(self) -> dict:
        """Train to the end (or a stop signal), evaluating as configured; returns the summary."""
        cfg, t = self.cfg, self.cfg.train
        if self.trial:
            self.metrics.write(self.trial.start_event())
        if self.env.is_rank0:
            self.writes.attempt("config.json", lambda: config_mod.save(cfg, self.run_dir / "config.json"))
            log.info(
                f"run {self.run_dir}: {cfg.model.name} on {cfg.data.dataset}, world size {self.env.world_size} "
                f"({self.env.backend}), {self.precision}, batch {t.batch_size} ({self.batch_per_rank}/rank), "
                f"{self.loader_kind} pipeline{f' ({self.loader_note})' if self.loader_note else ''}, "
                f"{self.total_steps} steps"
            )
            if t.precision == "auto":
                log.info(f"precision {self.precision} (auto: {self.precision_reason})")
        try:
            return self._train_to_end()
        except RuntimeError as e:  # torch's SIGCHLD handler, raised wherever this rank happens to be
            if "DataLoader worker" not in str(e):
                raise
            return self._worker_lost(e)

    def _worker_lost(self, e: RuntimeError) -> dict:
        """A DataLoader worker died (killed, out of memory): one line. While a stop signal is being
        handled by a single rank the checkpoint is still written (no peer waits in a collective)."""
        why = one_line(e, 200)
        if self.stop.requested and not self.env.initialized:
            log.warning(f"warning: {why} while stopping; writing the checkpoint anyway")
            self.save_checkpoint()
            self.handle_stop()
            return self.stopped()
        raise TrainingFailed(
            f"rank {self.env.rank}: {why} (out of memory? see the kernel log); continue with "
            f"--out {self.run_dir} --resume auto"
        )

    def _train_to_end(self) -> dict:
        t = self.cfg.train
        last_eval = None
        while self.step < self.total_steps and self.epoch < t.epochs:
            if self.run_epoch():
                return self.stopped()
            if self.epoch_step > self.steps_per_epoch:  # unreachable after check_resumable; never spin
                raise RuntimeError(f"position {self.epoch_step} is past the epoch's {self.steps_per_epoch} steps")
            if self.epoch_step == self.steps_per_epoch:
                self.epoch, self.epoch_step = self.epoch + 1, 0
                if t.eval_every and self.epoch % t.eval_every == 0 or self.epoch == t.epochs:
                    last_eval = self.run_eval()
                    if last_eval is None:
                        return self.stop_after_eval()
        self.profiler.end(self.step)  # a window past the end of training ends with it, or says so
        if last_eval is None or last_eval["step"] != self.step:
            last_eval = self.run_eval()
            if last_eval is None:
                return self.stop_after_eval()
        return self.finish(last_eval)

    def stop_after_eval(self) -> dict:
        """A stop signal arrived during an evaluation, which all ranks cut short: checkpoint, leave."""
        log.info(f"stop signal during evaluation: evaluation cut short at step {self.step}")
        self.save_checkpoint()
        self.handle_stop()
        return self.stopped()

    def stopped(self) -> dict:
        """The result of a run that a stop signal ended: exit code 0 only when SLURM requeued it."""
        return {"stopped": True, "step": self.step, "exit_code": 0 if self.requeued else self.stop.exit_code}

    def run_epoch(self, max_steps: int | None = None) -> bool:
        """Train from the current position to the end of the epoch (or `max_steps` steps);
        True if a stop signal ended it."""
        accum = self.cfg.train.grad_accum
        batches = self._batches()
        self.whiten_freeze.epoch(self.epoch)
        end = self.total_steps if max_steps is None else min(self.total_steps, self.step + max_steps)
        self.meter.start()
        interval = time.perf_counter(), 0, 0.0  # start, steps, seconds waiting for data
        while self.epoch_step < self.steps_per_epoch and self.step < end:
            self.profiler.start(self.step)
            with self.profiler.region(f"step {self.step}"):
                wait_from = time.perf_counter()
                # MixUp/CutMix (when on) turn each micro-batch's labels into soft targets, seeded by its position
                PHASES.enter(phases.DATA_WAIT, self.step + 1)
                with self.profiler.region("data_wait"):
                    micro = [self.mix(*next(batches), self.epoch, self.epoch_step * accum + i) for i in range(accum)]
                waited = time.perf_counter() - wait_from
                self.rank_times.data_waited(waited)
                signals, loss = self.train_step(micro)
            self.step, self.epoch_step = self.step + 1, self.epoch_step + 1
            self._batches_at = (self.epoch, self.epoch_step)
            interval = interval[0], interval[1] + 1, interval[2] + waited
            if self.lookahead:
                self.lookahead.step(self.step)
            if self.ema:
                self.ema.update(self.raw_model, self.step)
            self.rank_times.step_end()
            self.cadence.stepped()
            self.profiler.stop(self.step)
            self._guard_nonfinite(signals.nonfinite)
            if self.step % self.cfg.train.log_every == 0 or self.step == self.total_steps:
                self.log_train(float(loss), interval[1], time.perf_counter() - interval[0], interval[2])
                interval = time.perf_counter(), 0, 0.0
            self._raise_if_write_failed(signals.write_failed and (self.writes.pending or "run directory not writable"))
            periodic = self.ckpt_policy.periodic(self.step, signals.checkpoint_due, healthy=self.bad_steps == 0)
            if signals.stop or periodic:
                self.meter.pause()
                self.save_checkpoint()
                if signals.stop:
                    return self.handle_stop()
                self.meter.start()
        self.meter.pause()
        return False

    def _batches(self):
        """The epoch's batch iterator from the current position: the live one when it is there (run_steps
        keeps DataLoader workers running between calls), else a new one (a new epoch, or a resume)."""
        if self._live_batches is None or self._batches_at != (self.epoch, self.epoch_step):
            self._live_batches = delayed_for_test(
                self.pipeline.epoch(self.epoch, self.epoch_step * self.cfg.train.grad_accum), self.env.rank
            )
            self._batches_at = (self.epoch, self.epoch_step)
        return self._live_batches

    def run_steps(self, n: int) -> int:
        """Train up to n optimizer steps from the current position, crossing epochs; no evaluation or
        checkpoints beyond the configured ones. Returns the steps taken (benchmarks, profiling)."""
        start = self.step
        while self.step - start < n and self.step < self.total_steps:
            if self.run_epoch(max_steps=n - (self.step - start)):
                break
            if self.epoch_step == self.steps_per_epoch:
                self.epoch, self.epoch_step = self.epoch + 1, 0
        return self.step - start

    def _guard_nonfinite(self, bad: bool) -> None:
        if not bad:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        self.skipped_steps += 1
        self.metrics.write({"event": "nonfinite", "step": self.step, "consecutive": self.bad_steps})
        if self.precision != "fp16" and self.bad_steps >= self.cfg.train.nonfinite_patience:
            raise TrainingFailed(
                f"loss was NaN/Inf for {self.bad_steps} consecutive steps (step {self.step}); "
                f"lower --lr or check the data. The last good checkpoint is kept in {self.run_dir}"
            )

    def log_train(self, loss: float, steps: int, seconds: float, wait: float) -> None:
        images = steps * self.cfg.train.batch_size
        ips = images / max(seconds, 1e-9)
        smooth = self.rate.update(ips)  # one slow interval must not make the ETA jump
        rec = {
            "event": "train",
            "epoch": self.epoch,
            "step": self.step,
            "loss": loss,
            "lr": self.schedule.get_last_lr()[0],
            "images_per_sec": ips,
            "images_per_sec_per_rank": ips / self.env.world_size,
            "data_wait_frac": wait / max(seconds, 1e-9),
            "epoch_seconds": self.steps_per_epoch * self.cfg.train.batch_size / max(smooth, 1e-9),
            "eta_seconds": (self.total_steps - self.step) * self.cfg.train.batch_size / max(smooth, 1e-9),
            "memory_mb": memory_mb(self.env.device),
        }
        if self.precision == "fp16":
            rec["scaler_scale"] = self.scaler.get_scale()
        if self.rank_figures is not None:
            rec.update(self.rank_figures)
            straggler, message = self.stragglers.check(self.rank_figures)
            if straggler is not None:
                rec["straggler_rank"] = straggler
            if message:
                log.info(message)
            self.rank_figures = None
        self.metrics.write(rec)
        self.reporter.metrics(rec)
        self.wandb.log_train(rec)
        self.tensorboard.log_train(rec)
        self.progress.update(self.step, rec)

    requeued = False

    def handle_stop(self) -> bool:
        requeue, pruned = process_group.broadcast_object((self.stop.wants_requeue, self.stop.pruned), self.env)
        if pruned:  # rank 0's decision, which the other ranks only saw as "stop"
            log.info(f"pruned by the sweep: checkpoint written at step {self.step}")
            self.wandb.finish()
            self.tensorboard.finish()
            self.progress.close()
            return True
        log.info(f"stop signal: checkpoint written at step {self.step}")
        self.wandb.finish()  # complete the W&B files inside the grace period; a requeue resumes the run
        self.tensorboard.finish()
        failed = requeue and self.env.is_rank0 and not requeue_slurm_job()
        if process_group.broadcast_object(failed, self.env):  # unfinished and not requeued: not a success
            raise TrainingFailed(
                f"stopped at step {self.step} and could not requeue; continue with --out {self.run_dir} --resume auto"
            )
        self.requeued = requeue
        if not requeue:
            log.info(
                f"the run is unfinished (exit code {self.stop.exit_code}); continue it with "
                f"--out {self.run_dir} --resume auto"
            )
        self.progress.close()
        return True

    def _evaluate(self, model) -> dict | None:
        """The test metrics of `model`; None when a stop signal cut the evaluation short."""
        return evaluate_source(
            model,
            self.data,
            normalize=self.normalize,
            env=self.env,
            precision=self.precision,
            batch_size=1000 if self.data.adaptive_eval else 2 * self.batch_per_rank,
            workers=self.cfg.data.workers,
            tta=self.cfg.train.tta,
            should_stop=lambda: self.stop.requested,
        )

    def run_eval(self) -> dict | None:
        """The test metrics (logged, and a checkpoint when they are the best so far); None when a stop
        signal cut the evaluation short."""
        with PHASES.during(phases.EVALUATION):
            return self._run_eval()

    def _run_eval(self) -> dict | None:
        # The plain module, not the DDP wrapper: DDP's forward broadcasts BatchNorm buffers, a collective
        # that a rank without test images would never join (evaluate syncs the buffers once, up front).
        res = self._evaluate(self.raw_model)
        if res is None:
            return None
        res["skipped_images"] = self._count_skipped()
        rec = {"event": "eval", "epoch": self.epoch, "step": self.step, **res, "train_seconds": self.meter.seconds}
        score, winner, ema_note = res["test_accuracy"], "model", ""
        if self.ema:  # the average is scored beside the model; the better of the two may make best.pt
            ema = self._evaluate(self.ema.module)
            if ema is None:
                return None
            rec.update({f"ema_{k}": v for k, v in ema.items() if k != "confusion_matrix"})
            if ema["test_accuracy"] > score:
                score, winner = ema["test_accuracy"], "ema"
            rec["best_weights"] = winner
            ema_note = f", EMA {ema['test_accuracy']:.4f}"
        self.metrics.write(rec)
        self.reporter.metrics({k: v for k, v in rec.items() if k != "confusion_matrix"})
        self.wandb.log_eval(rec, self.data.classes)
        self.tensorboard.log_eval(rec, self.data.classes)
        if self.trial and self.trial.should_prune(rec, last=self.step >= self.total_steps):
            self.metrics.write({"event": "pruned", "step": self.step, "epoch": self.epoch})
            self.stop.prune()  # rank 0's stop flag: all ranks agree on it at the next step
        log.info(
            f"epoch {self.epoch}: test accuracy {res['test_accuracy']:.4f} "
            f"({res['test_correct']}/{res['test_total']}){ema_note}, {self.meter.seconds:.1f} s of training"
        )
        if score > self.best_acc:
            self.best_acc, self.best_weights = score, winner
            self.save_checkpoint(is_best=True)
        return rec

    def _count_skipped(self) -> int:
        """Distinct unreadable files any rank has found (--skip-bad-images); new ones are named in the log."""
        mine = self.data.skipped_names()
        found = [mine]
        if self.env.initialized:
            found = [None] * self.env.world_size
            torch.distributed.all_gather_object(found, mine)
        new = sorted(set().union(*found) - self.skipped_images)
        if new:
            log.info(
                f"skipped {len(new)} unreadable image(s) (--skip-bad-images): {', '.join(new[:5])}"
                f"{' ...' if len(new) > 5 else ''}"
            )
        self.skipped_images.update(new)
        return len(self.skipped_images)

    def finish(self, ev: dict) -> dict:
        summary = self.summary(ev)
        self.save_checkpoint(final=True, summary=summary)
        if self.env.is_rank0:
            export = checkpoint.assemble(export_components(self))
            self.writes.attempt("model.pt", lambda: checkpoint.atomic_save(export, self.run_dir / "model.pt"))
            self.writes.attempt("summary.json", lambda: write_json_atomic(self.run_dir / "summary.json", summary))
            self.wandb.finish(summary)
            self.tensorboard.finish(summary)
            self._report(summary)
        self._raise_if_write_failed(process_group.broadcast_object(self.writes.pending, self.env))
        self.progress.close()
        return summary

    def summary(self, ev: dict) -> dict:
        cfg, d, seconds = self.cfg, self.data, self.meter.seconds
        summary = {k: ev[k] for k in ("test_accuracy", "test_correct", "test_total", "per_class_accuracy")}
        summary.update(
            {
                "classes": d.classes,
                "epochs": self.epoch,  # completed epochs
                "epochs_trained": round(self.step / self.steps_per_epoch, 4),  # 9.9 for airbench's 9.9
                "steps": self.step,
                "world_size": self.env.world_size,
                "backend": self.env.backend,
                "per_rank_batch_size": self.batch_per_rank * cfg.train.grad_accum,
                "global_batch_size": cfg.train.batch_size,
                "grad_accum": cfg.train.grad_accum,
                "train_seconds": seconds,
                "train_images_per_sec": self.step * cfg.train.batch_size / max(seconds, 1e-9),
                "model": cfg.model.name,
                "dataset": cfg.data.dataset,
                "precision": self.precision,
                "loader": self.loader_kind,
                "device": str(self.env.device),
                "skipped_steps": self.skipped_steps,
                "skipped_images": len(self.skipped_images),
                "parameters": sum(p.numel() for p in self.raw_model.parameters()),
                "run_dir": str(self.run_dir),
            }
        )
        if self.ema:
            summary.update({k: ev[k] for k in ("ema_test_accuracy", "ema_test_correct", "best_weights")})
        return summary

    def _report(self, summary: dict) -> None:
        if self.writes.pending:
            return
        try:
            if self.cfg.log.plots:
                write_plots(self.run_dir)
        except OSError as e:  # a write failure: the run's policy
            self.writes.failed("the plots", e)
        except Exception as e:  # plots are a convenience; the run's results are already written
            log.warning(f"warning: plots not written: {one_line(e)}")
        log.info(format_report(summary, self.metrics.history))


def train(cfg: Config, data: DataSource | None = None, model_factory=None, reporter: Reporter | None = None) -> dict:
    with process_group.process_group(cfg.dist.backend, cfg.dist.timeout, cfg.dist.setup_timeout) as env:
        console.configure(cfg.log.log_level, env.rank, env.world_size)
        log.debug(
            f"rank {env.rank} of {env.world_size} ({env.launcher} launch, {env.backend}), device {env.device}, "
            f"{torch.get_num_threads()} threads"
        )
        if env.device.type == "cpu" and cfg.train.malloc_tune:
            tune_malloc()  # before the model and the data take their memory
        trainer = Trainer(cfg, env, data=data, model_factory=model_factory, reporter=reporter)
        try:
            result = trainer.fit()
            trainer.heartbeat.stop()  # kept running on failure: the hang report reads it
            return result
        except BaseException:
            # Complete the W&B files before leaving: a rank that lost its peers exits with os._exit
            # (commands.entry), which skips wandb's own exit hooks and would leave the run unreadable.
            trainer.wandb.finish()
            raise
        finally:
            trainer.progress.close()  # an unfinished run's bar too: console lines go back to stdout
            trainer.stop.uninstall()
