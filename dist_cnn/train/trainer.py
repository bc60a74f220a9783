"""The trainer: composes data, model, DDP, optimizer, checkpoints and metrics into one loop.

Every rank runs the same code and takes part in every collective; only rank 0 writes or prints
(the run directory, metrics, W&B and the progress bar are no-ops elsewhere).
"""

from __future__ import annotations

import contextlib
import random
import resource
import time
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_cnn import config as config_mod
from dist_cnn.config import Config
from dist_cnn.data.augment import BatchMix, ImageAugment
from dist_cnn.data.datasets import Dataset, load_dataset
from dist_cnn.data.loader import Augment, DevicePipeline, LoaderPipeline
from dist_cnn.data.stream import FolderIndex, StreamEval, StreamPipeline, attach_sample, default_workers, open_folder
from dist_cnn.distributed import parallel
from dist_cnn.distributed import process_group as D
from dist_cnn.distributed.preempt import StopSignal, requeue_slurm_job
from dist_cnn.errors import PeerFailed, TrainingFailed, UserError, one_line
from dist_cnn.fileio import WritePolicy, write_json_atomic
from dist_cnn.models.prepare import prepare_model
from dist_cnn.observability.metrics import MetricsLog
from dist_cnn.observability.progress import Progress, RateAverage
from dist_cnn.observability.rank_times import RankTimes, StragglerWatch, delayed_for_test, slots, unpack
from dist_cnn.observability.report import format_report, write_plots
from dist_cnn.observability.tensorboard_logger import TensorBoardLogger
from dist_cnn.observability.wandb_logger import WandbLogger
from dist_cnn.train import checkpoint
from dist_cnn.train import precision as P
from dist_cnn.train.allocator import tune_malloc
from dist_cnn.train.checkpoint import CheckpointPolicy
from dist_cnn.train.ema import ModelEMA, adjusted_decay
from dist_cnn.train.evaluate import evaluate, evaluate_batches
from dist_cnn.train.optim import Lookahead, build_optimizer, build_schedule, total_steps
from dist_cnn.train.profiling import StepProfiler
from dist_cnn.train.rundir import prepare_run_dir, resolve_resume


class StepSignals(NamedTuple):
    """What all ranks agreed on after a step (one small all_reduce carries all four, and at the end
    of a log interval every rank's time accounting: rank_times)."""

    nonfinite: bool  # some rank's loss was NaN/Inf: the step is not applied
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
    `model_factory` builds the model instead of `cfg.model.name` (the Python API)."""

    def __init__(self, cfg: Config, env: D.DistEnv, data: Dataset | None = None, model_factory=None):
        self.cfg, self.env = cfg, env
        t, main = cfg.train, env.is_main
        self.log = Progress(main, False, 0).print  # replaced once the step count is known
        micro_world = env.world_size * t.grad_accum
        if t.batch_size % micro_world:
            raise UserError(f"--batch-size {t.batch_size} must divide by world size x grad accum = {micro_world}")
        self.batch_per_rank = t.batch_size // micro_world
        if t.precision == "fp16" and env.device.type == "cpu":
            raise UserError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
        seed_everything(t.seed)

        # The run directory and the checkpoint to resume are settled before the data is loaded: a
        # directory in use, foreign or read-only, or a file that is no checkpoint, fails at once.
        self.run_dir = D.main_only(env, lambda: prepare_run_dir(cfg, log=self.log))
        self.resume_path, state = resolve_resume(cfg, env, self.run_dir, self.log)
        self.loader_note = ""  # why auto chose the pipeline it chose, for the first log line
        self.data = data or self._load_data()

        prepared = prepare_model(
            cfg, self.data, env.device, factory=model_factory, starting_weights=state is None, log=self.log
        )
        self.normalize, self.mean, self.std = prepared.normalize, prepared.mean, prepared.std
        self.rank_times, self.stragglers, self.rank_figures = RankTimes(env.device), StragglerWatch(), None
        self.model, self.raw_model = parallel.wrap(
            prepared.model, env, cfg.model, t.grad_accum, on_grads_ready=self.rank_times.grads_ready
        )
        # A resumed run keeps the precision it started with, whatever `auto` would measure now.
        self.precision, self.precision_reason = (
            (state["precision"], "kept from the checkpoint")
            if state and t.precision == "auto"
            else D.main_only(env, self._resolve_precision)
        )
        self.optimizer = build_optimizer(self.model, cfg.optim, env.device)
        self.pipeline = self._build_pipeline()
        self.steps_per_epoch = self.pipeline.steps_per_epoch // t.grad_accum
        if self.steps_per_epoch == 0:
            raise UserError(f"--batch-size {t.batch_size} is larger than the training set ({self.pipeline.n})")
        self.total_steps = total_steps(t.epochs, self.steps_per_epoch, t.max_steps)
        self.schedule = build_schedule(self.optimizer, self.total_steps, cfg.optim)
        self.scaler = P.grad_scaler(self.precision, env.device)
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
        self.mix = BatchMix(cfg.data.mixup_alpha, cfg.data.cutmix_alpha, self.data.num_classes, t.seed, env.rank)
        self.best_weights = "model"  # which weights best.pt holds the best score of: model or ema

        self.step, self.epoch, self.epoch_step = 0, 0, 0
        self.skipped_images: set[str] = set()  # unreadable files found so far (--skip-bad-images)
        self._live_batches, self._batches_at = None, None
        self.meter, self.best_acc, self.bad_steps, self.skipped_steps = Meter(), -1.0, 0, 0
        self.rate = RateAverage()
        self.ckpt_policy = CheckpointPolicy(cfg.ckpt)
        self.writes = WritePolicy(cfg.ckpt.on_write_error, lambda msg: self.log(msg))
        self.metrics = MetricsLog(self.run_dir, main, on_error=self.writes.failed)
        self.wandb_id = None
        if state is not None:
            self._load_state(state)
        self.progress = Progress(main, cfg.log.progress, self.total_steps)
        self.log = self.progress.print
        self.wandb = WandbLogger(cfg.log, self.run_dir, config_mod.to_dict(cfg), self.wandb_id, main, self.log)
        self.tensorboard = TensorBoardLogger(
            self.run_dir, main and cfg.log.tensorboard, self.step if state is not None else None, self.log
        )
        self.stop = StopSignal(announce=main)
        self.stop.install()
        self.profiler = StepProfiler(
            cfg.log.profile, self.run_dir, env.rank, env.device, cfg.log.profile_stack, self.log
        )

    # ---- setup -------------------------------------------------------------------------------
    def _load_data(self):
        """In-memory tensors, or the file index of an image folder to stream (stream.open_folder)."""
        index, self.loader_note = open_folder(self.cfg.data, self.env)
        if index is not None:
            return attach_sample(index, self.cfg.data, self.env)
        return D.main_then_all(self.env, lambda: load_dataset(self.cfg.data, log=self.log))

    @property
    def train_size(self) -> int:
        return len(self.data.train) if isinstance(self.data, FolderIndex) else len(self.data.train_x)

    def _resolve_precision(self) -> tuple[str, str]:
        """(precision, why); `auto` is a rule from the hardware, or a measurement cached per machine,
        model, input and batch, so the same command resolves the same way every time."""
        if self.cfg.train.precision != "auto":
            return self.cfg.train.precision, "as asked"
        n, d = min(self.batch_per_rank, 64), self.data
        x, y = (d.sample.x, d.sample.y) if isinstance(d, FolderIndex) else (d.train_x, d.train_y)
        x, y = self.normalize(x[:n].to(self.env.device)), y[:n].to(self.env.device)
        probe = P.time_training_step(self.raw_model, x, y)
        what = {
            "model": self.cfg.model.name,
            "input": list(x.shape[1:]),
            "batch": n,
            "channels_last": self.cfg.model.channels_last,
        }
        return P.resolve_auto(self.env.device, what, probe)

    def _build_pipeline(self):
        cfg, env, d = self.cfg, self.env, self.data
        kw = dict(
            batch_per_rank=self.batch_per_rank,
            rank=env.rank,
            world=env.world_size,
            seed=cfg.train.seed,
            aug=Augment(cfg.data.crop_padding, cfg.data.flip, cfg.data.alternate_flip),
            image_aug=ImageAugment(cfg.data.auto_augment, cfg.data.random_erase, cfg.train.seed, self.mean),
            normalize=self.normalize,
            device=env.device,
        )
        if isinstance(d, FolderIndex):
            self.loader_kind, self._test_stream = "stream", None
            return StreamPipeline(
                d.train,
                workers=cfg.data.workers,
                image_size=d.image_size,
                crop_scale=config_mod.parse_crop_scale(cfg.data.crop_scale),
                skip_bad=cfg.data.skip_bad_images,
                decode=cfg.data.decode,
                **kw,
            )
        kind = cfg.data.loader
        if kind == "auto":
            kind = "device" if self._fits_on_device(d.train_x) else "dataloader"
        self.loader_kind = kind
        if kind == "device":
            return DevicePipeline(d.train_x, d.train_y, **kw)
        return LoaderPipeline(d.train_x, d.train_y, workers=default_workers(cfg.data.workers), **kw)

    def _fits_on_device(self, x: torch.Tensor) -> bool:
        if self.env.device.type != "cuda":
            return True  # already in RAM: the device pipeline just indexes it
        free, _ = torch.cuda.mem_get_info(self.env.device)
        return x.numel() * 2 < free * 0.5  # uint8 data plus room for the model

    # ---- checkpoint state --------------------------------------------------------------------
    def _state(self) -> dict:
        rngs = [checkpoint.rng_state()]
        if self.env.initialized:
            rngs = [None] * self.env.world_size
            torch.distributed.all_gather_object(rngs, checkpoint.rng_state())
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "epoch_step": self.epoch_step,
            "train_seconds": self.meter.seconds,
            "best_acc": self.best_acc,
            "skipped_steps": self.skipped_steps,
            "rng": rngs,
            "world_size": self.env.world_size,
            "config": config_mod.to_dict(self.cfg),
            "wandb_id": self.wandb.run_id,
            "metrics": self.metrics.history,
            "finished": False,
            "precision": self.precision,
            "mean": self.mean,
            "std": self.std,
            "loader": self.loader_kind,
            "train_size": self.train_size,
            "skipped_images": sorted(self.skipped_images),
            "comm_hook": parallel.comm_hook_record(self.cfg.model, self.env.world_size),
            "lookahead": self.lookahead.state_dict() if self.lookahead else {},
            "ema": self.ema.state_dict() if self.ema else {},
            "best_weights": self.best_weights,
            # what `dist-cnn predict/export` need without the dataset (model.pt carries the same)
            "model_name": self.cfg.model.name,
            "classes": self.data.classes,
            "in_channels": self.data.in_channels,
            "image_size": self.data.image_size,
        }

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
        self.raw_model.load_state_dict(s["model"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.schedule.load_state_dict(s["schedule"])
        self.scaler.load_state_dict(s["scaler"])
        if self.lookahead:
            self.lookahead.load_state_dict(s["lookahead"])
        if self.ema:
            self.ema.load_state_dict(s["ema"])
        self.best_weights = s.get("best_weights", "model")
        self.step, self.epoch, self.epoch_step = s["step"], s["epoch"], s["epoch_step"]
        self.meter, self.best_acc, self.skipped_steps = Meter(s["train_seconds"]), s["best_acc"], s["skipped_steps"]
        self.wandb_id = s["wandb_id"]
        self.skipped_images = set(s.get("skipped_images", []))
        checkpoint.set_rng_state(s["rng"][self.env.rank % len(s["rng"])])
        self.metrics.history = list(s["metrics"])
        checkpoint.scrub_missing(self.metrics.history)  # events naming checkpoints pruned since
        self.metrics.rewrite()
        self.metrics.write({"event": "resume", "step": self.step, "epoch": self.epoch, "from": str(self.resume_path)})
        self.log(
            f"resumed from {self.resume_path} at step {self.step} (epoch {self.epoch + 1}, "
            f"step {self.epoch_step} of {self.steps_per_epoch})"
        )

    def save_checkpoint(self, is_best: bool = False, final: bool = False) -> None:
        """All ranks call this (RNG states are gathered); rank 0 writes while the others wait."""
        state = self._state()
        state["finished"] = final
        err = None
        if self.env.is_main:
            try:
                path, pruned = checkpoint.write(self.run_dir, state, self.cfg.ckpt.keep, is_best)
            except OSError as e:  # torch.save's own write errors arrive as OSError too (fileio)
                err = f"checkpoint write failed at step {self.step} ({e.strerror or e}); the previous one is intact"
                self.log(f"warning: {err}")
            else:
                self.metrics.write({"event": "checkpoint", "step": self.step, "path": str(path)})
                if pruned and checkpoint.scrub_missing(self.metrics.history):
                    self.metrics.rewrite()  # metrics.jsonl never names a checkpoint that is gone
        err = D.broadcast_object(err, self.env)
        if err and self.cfg.ckpt.on_write_error == "stop":
            raise TrainingFailed(err) if self.env.is_main else PeerFailed(err)
        self._raise_if_write_failed(D.broadcast_object(self.writes.pending, self.env))
        self.ckpt_policy.written()

    def _raise_if_write_failed(self, pending: str | None) -> None:
        """All ranks call this with the same answer (agreed on by a collective)."""
        if pending:
            raise TrainingFailed(pending) if self.env.is_main else PeerFailed(pending)

    # ---- training ----------------------------------------------------------------------------
    def train_step(self, micro_batches) -> tuple[StepSignals, torch.Tensor]:
        """One optimizer step over grad_accum micro-batches; returns what all ranks agreed on, and the loss."""
        model, accum = self.model, len(micro_batches)
        loss_sum = torch.zeros((), device=self.env.device)
        for i, (x, y) in enumerate(micro_batches):
            last = i == accum - 1
            with contextlib.nullcontext() if last or not isinstance(model, DDP) else model.no_sync():
                with self.profiler.region("forward"), P.autocast(self.precision, self.env.device):
                    loss = F.cross_entropy(model(x), y, label_smoothing=self.cfg.optim.label_smoothing) / accum
                loss_sum += loss.detach().float()
                if last:  # the loss is known before the backward pass: agree while it runs
                    agreement = self._agree(loss_sum)
                with self.profiler.region("backward"):
                    self.scaler.scale(loss).backward()
        self.rank_times.backward_done()
        whiten = getattr(self.raw_model, "whiten", None)
        if whiten is not None and self.epoch >= self.cfg.model.freeze_whiten_bias_after:
            whiten.bias.grad = None  # airbench trains the whitening bias for the first epochs only
        if self.cfg.optim.clip_grad_norm:  # on the true gradients: unscaled from fp16's loss scale first
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), self.cfg.optim.clip_grad_norm)
        with self.profiler.region("optimizer"):
            signals = self._apply(agreement)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
            self.schedule.step()
        return signals, loss_sum

    def _apply(self, agreement: parallel.Agreement) -> StepSignals:
        """The optimizer step, unless some rank's loss was non-finite."""
        if self.precision == "fp16":  # the scaler skips non-finite steps by itself
            self.scaler.step(self.optimizer)
            return self._signals(agreement)
        if self.optimizer.defaults.get("fused"):
            # fused SGD skips the update on the device when found_inf is 1: no host sync for the guard,
            # and the flags are read after the step is queued (from pinned memory, see Agreement)
            self.optimizer.found_inf = agreement.on_device()[:1]
            self.optimizer.step()
            del self.optimizer.found_inf
            return self._signals(agreement)
        signals = self._signals(agreement)  # long done: it ran alongside the backward pass
        if not signals.nonfinite:
            self.optimizer.step()
        return signals

    def _signals(self, agreement: parallel.Agreement) -> StepSignals:
        """The agreed flags; every rank's time accounting when the step closed a log interval."""
        values = agreement.values()
        n = len(StepSignals._fields)
        figures = unpack(values[n:], self.env.world_size)
        if figures is not None:
            self.rank_figures = figures
        return StepSignals(*(v > 0 for v in values[:n]))

    def _agree(self, loss: torch.Tensor) -> parallel.Agreement:
        """One small all_reduce (max) a step carries everything the ranks must decide together; it is
        started before the backward pass and read after it."""
        due = self.env.is_main and self.ckpt_policy.clock_due()
        host = torch.tensor([float(self.stop.requested), float(due), float(self.writes.pending is not None)])
        closing = (self.step + 1) % self.cfg.train.log_every == 0 or self.step + 1 == self.total_steps
        figures = self.rank_times.snapshot() if closing else None  # this interval's, to rank 0
        host = torch.cat([host, slots(self.env.rank, self.env.world_size, figures)])
        if loss.is_cuda:  # from pinned memory: an asynchronous copy, no wait for the GPU
            host = host.pin_memory().to(loss.device, non_blocking=True)
        return parallel.Agreement(torch.cat([(~torch.isfinite(loss)).float().view(1), host]))

    def fit(self) -> dict:
        """Train to the end (or a stop signal), evaluating as configured; returns the summary."""
        cfg, t = self.cfg, self.cfg.train
        if self.env.is_main:
            self.writes.attempt("config.json", lambda: config_mod.save(cfg, self.run_dir / "config.json"))
            self.log(
                f"run {self.run_dir}: {cfg.model.name} on {cfg.data.dataset}, world size {self.env.world_size} "
                f"({self.env.backend}), {self.precision}, batch {t.batch_size} ({self.batch_per_rank}/rank), "
                f"{self.loader_kind} pipeline{f' ({self.loader_note})' if self.loader_note else ''}, "
                f"{self.total_steps} steps"
            )
            if t.precision == "auto":
                self.log(f"precision {self.precision} (auto: {self.precision_reason})")
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
        self.profiler.stop(self.step, force=True)  # a window past the end of training ends with it
        if last_eval is None or last_eval["step"] != self.step:
            last_eval = self.run_eval()
            if last_eval is None:
                return self.stop_after_eval()
        return self.finish(last_eval)

    def stop_after_eval(self) -> dict:
        """A stop signal arrived during an evaluation, which all ranks cut short: checkpoint, leave."""
        self.log(f"stop signal during evaluation: evaluation cut short at step {self.step}")
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
        end = self.total_steps if max_steps is None else min(self.total_steps, self.step + max_steps)
        self.meter.start()
        interval = time.perf_counter(), 0, 0.0  # start, steps, seconds waiting for data
        while self.epoch_step < self.steps_per_epoch and self.step < end:
            self.profiler.start(self.step)
            with self.profiler.region(f"step {self.step}"):
                wait_from = time.perf_counter()
                # MixUp/CutMix (when on) turn each micro-batch's labels into soft targets, seeded by its position
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
                self.log(message)
            self.rank_figures = None
        self.metrics.write(rec)
        self.wandb.log_train(rec)
        self.tensorboard.log_train(rec)
        self.progress.update(self.step, rec)

    requeued = False

    def handle_stop(self) -> bool:
        requeue = D.broadcast_object(self.stop.wants_requeue, self.env)
        self.log(f"stop signal: checkpoint written at step {self.step}")
        self.wandb.finish()  # complete the W&B files inside the grace period; a requeue resumes the run
        self.tensorboard.finish()
        failed = requeue and self.env.is_main and not requeue_slurm_job(self.log)
        if D.broadcast_object(failed, self.env):  # unfinished and not requeued: not a success
            raise TrainingFailed(
                f"stopped at step {self.step} and could not requeue; continue with --out {self.run_dir} --resume auto"
            )
        self.requeued = requeue
        if not requeue:
            self.log(
                f"the run is unfinished (exit code {self.stop.exit_code}); continue it with "
                f"--out {self.run_dir} --resume auto"
            )
        self.progress.close()
        return True

    def _evaluate(self, model) -> dict | None:
        """The test metrics of `model`; None when a stop signal cut the evaluation short."""
        d = self.data
        if isinstance(d, FolderIndex):
            return evaluate_batches(
                model,
                self._test_batches(),
                len(d.test),
                num_classes=d.num_classes,
                env=self.env,
                precision=self.precision,
                tta=self.cfg.train.tta,
                should_stop=lambda: self.stop.requested,
            )
        return evaluate(
            model,
            d.test_x,
            d.test_y,
            num_classes=d.num_classes,
            normalize=self.normalize,
            env=self.env,
            precision=self.precision,
            tta=self.cfg.train.tta,
            should_stop=lambda: self.stop.requested,
        )

    def run_eval(self) -> dict | None:
        """The test metrics (logged, and a checkpoint when they are the best so far); None when a stop
        signal cut the evaluation short."""
        res = self._evaluate(self.model)
        if res is None:
            return None
        if isinstance(self.data, FolderIndex):
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
        self.wandb.log_eval(rec, self.data.classes)
        self.tensorboard.log_eval(rec, self.data.classes)
        self.log(
            f"epoch {self.epoch}: test accuracy {res['test_accuracy']:.4f} "
            f"({res['test_correct']}/{res['test_total']}){ema_note}, {self.meter.seconds:.1f} s of training"
        )
        if score > self.best_acc:
            self.best_acc, self.best_weights = score, winner
            self.save_checkpoint(is_best=True)
        return rec

    def _test_batches(self):
        """This rank's shard of a streamed test folder (workers started once, kept between evaluations)."""
        if self._test_stream is None:
            c, d = self.cfg.data, self.data
            self._test_stream = StreamEval(
                d.test,
                rank=self.env.rank,
                world=self.env.world_size,
                image_size=d.image_size,
                eval_crop_ratio=c.eval_crop_ratio,
                device=self.env.device,
                workers=c.workers,
                batch_size=2 * self.batch_per_rank,
                skip_bad=c.skip_bad_images,
                decode=c.decode,
            )
        return self._test_stream.batches(self.normalize)

    def _count_skipped(self) -> int:
        """Distinct unreadable files any rank has found (--skip-bad-images); new ones are named in the log."""
        d = self.data
        mine = {d.train.path(i) for i in self.pipeline.skipped} | {d.test.path(i) for i in self._test_stream.skipped}
        found = [mine]
        if self.env.initialized:
            found = [None] * self.env.world_size
            torch.distributed.all_gather_object(found, mine)
        new = sorted(set().union(*found) - self.skipped_images)
        if new:
            self.log(
                f"skipped {len(new)} unreadable image(s) (--skip-bad-images): {', '.join(new[:5])}"
                f"{' ...' if len(new) > 5 else ''}"
            )
        self.skipped_images.update(new)
        return len(self.skipped_images)

    def finish(self, ev: dict) -> dict:
        summary = self.summary(ev)
        self.save_checkpoint(final=True)
        if self.env.is_main:
            cfg, d = self.cfg, self.data
            export = {
                "model": self.raw_model.state_dict(),
                "model_name": cfg.model.name,
                "classes": d.classes,
                "in_channels": d.in_channels,
                "image_size": d.image_size,
                "loader": self.loader_kind,
                "mean": self.mean,
                "std": self.std,
                "config": config_mod.to_dict(cfg),
            }
            if self.ema:
                export["ema"] = self.ema.module.state_dict()
            self.writes.attempt("model.pt", lambda: checkpoint.atomic_save(export, self.run_dir / "model.pt"))
            self.writes.attempt("summary.json", lambda: write_json_atomic(self.run_dir / "summary.json", summary))
            self.wandb.finish(summary)
            self.tensorboard.finish(summary)
            self._report(summary)
        self._raise_if_write_failed(D.broadcast_object(self.writes.pending, self.env))
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
            write_plots(self.run_dir)
        except OSError as e:  # a write failure: the run's policy
            self.writes.failed("the plots", e)
        except Exception as e:  # plots are a convenience; the run's results are already written
            self.log(f"warning: plots not written: {one_line(e)}")
        self.log(format_report(summary, self.metrics.history))


def train(cfg: Config, data: Dataset | None = None, model_factory=None) -> dict:
    with D.process_group(cfg.dist.backend, cfg.dist.timeout) as env:
        if env.device.type == "cpu" and cfg.train.malloc_tune:
            tune_malloc()  # before the model and the data take their memory
        trainer = Trainer(cfg, env, data=data, model_factory=model_factory)
        try:
            return trainer.fit()
        except BaseException:
            # Complete the W&B files before leaving: a rank that lost its peers exits with os._exit
            # (commands.entry), which skips wandb's own exit hooks and would leave the run unreadable.
            trainer.wandb.finish()
            raise
