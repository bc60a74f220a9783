"""The trainer: composes data, model, DDP, optimizer, checkpoints and metrics into one loop.

Every rank runs the same code and takes part in every collective; only rank 0 writes or prints
(the run directory, metrics, W&B and the progress bar are no-ops elsewhere).
"""
from __future__ import annotations

import contextlib
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from . import checkpoint, config as config_mod, distributed as D, parallel, precision as P
from .config import Config
from .data import load_dataset
from .errors import UserError
from .evaluate import evaluate
from .loader import Augment, DevicePipeline, LoaderPipeline, Normalize, normalization_stats
from .metrics import MetricsLog, Progress, write_json_atomic
from .models import build_model
from .optim import Lookahead, build_optimizer, build_schedule
from .preempt import StopSignal, requeue_slurm_job
from .rundir import prepare_run_dir, resolve_resume
from .wandb_logger import WandbLogger


class TrainingFailed(Exception):
    """The run could not go on (non-finite loss, failed checkpoint write): one line, exit code 1."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Trainer:
    def __init__(self, cfg: Config, env: D.DistEnv):
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

        self.run_dir = D.main_only(env, lambda: prepare_run_dir(cfg, env))
        self.data = D.main_then_all(env, lambda: load_dataset(cfg.data, log=self.log))
        self.resume_path, state = resolve_resume(cfg, env, self.run_dir, self.log)

        self.model = self._build_model()
        # A resumed run keeps the precision it started with, whatever `auto` would measure now.
        self.precision = state["precision"] if state and t.precision == "auto" else \
            D.main_only(env, self._resolve_precision)
        self.optimizer = build_optimizer(self.model, cfg.optim, env.device)
        self.pipeline = self._build_pipeline()
        self.steps_per_epoch = self.pipeline.steps_per_epoch // t.grad_accum
        if self.steps_per_epoch == 0:
            raise UserError(f"--batch-size {t.batch_size} is larger than the training set ({len(self.data.train_x)})")
        self.total_steps = t.epochs * self.steps_per_epoch
        if t.max_steps:
            self.total_steps = min(self.total_steps, t.max_steps)
        self.schedule = build_schedule(self.optimizer, self.total_steps, cfg.optim)
        self.scaler = P.grad_scaler(self.precision, env.device)
        self.lookahead = Lookahead(self.raw_model, t.lookahead_every, t.lookahead_decay, self.total_steps) \
            if t.lookahead_every else None

        self.step, self.epoch, self.epoch_step = 0, 0, 0
        self.train_seconds, self.best_acc, self.bad_steps, self.skipped_steps = 0.0, -1.0, 0, 0
        self.metrics = MetricsLog(self.run_dir, main)
        self.wandb_id = None
        if state is not None:
            self._load_state(state)
        self.progress = Progress(main, cfg.log.progress, self.total_steps)
        self.log = self.progress.print
        self.wandb = WandbLogger(cfg.log, self.run_dir, config_mod.to_dict(cfg), self.wandb_id, main, self.log)
        self.stop = StopSignal()
        self.stop.install()

    # ---- setup -------------------------------------------------------------------------------
    def _build_model(self):
        cfg, env, d = self.cfg, self.env, self.data
        model = build_model(cfg.model.name, d.in_channels, d.num_classes, d.image_size)
        self.mean, self.std = normalization_stats(d.train_x, cfg.data.normalize)
        self.normalize = Normalize(self.mean, self.std, env.device, cfg.model.channels_last)
        if hasattr(model, "init_from_data"):  # e.g. airbench's whitening layer; same data on all ranks
            model.init_from_data(self.normalize(d.train_x[:5000].to(env.device)).cpu())
        model.to(env.device)
        if cfg.model.channels_last:
            model.to(memory_format=torch.channels_last)
        model, self.raw_model = parallel.wrap(model, env, cfg.model, cfg.train.grad_accum)
        return model

    def _resolve_precision(self) -> str:
        n = min(self.batch_per_rank, 64)
        x = self.normalize(self.data.train_x[:n].to(self.env.device))
        probe = P.time_training_step(self.raw_model, x, self.data.train_y[:n].to(self.env.device))
        return P.resolve(self.cfg.train.precision, self.env.device, probe)

    def _build_pipeline(self):
        cfg, env, d = self.cfg, self.env, self.data
        kind = cfg.data.loader
        if kind == "auto":
            kind = "device" if self._fits_on_device(d.train_x) else "dataloader"
        self.loader_kind = kind
        kw = dict(batch_per_rank=self.batch_per_rank, rank=env.rank, world=env.world_size, seed=cfg.train.seed,
                  aug=Augment(cfg.data.crop_padding, cfg.data.flip, cfg.data.alternate_flip),
                  normalize=self.normalize, device=env.device)
        if kind == "device":
            return DevicePipeline(d.train_x, d.train_y, **kw)
        return LoaderPipeline(d.train_x, d.train_y, workers=cfg.data.workers, **kw)

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
        return {"model": self.raw_model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "scaler": self.scaler.state_dict(),
                "step": self.step, "epoch": self.epoch, "epoch_step": self.epoch_step,
                "train_seconds": self.train_seconds, "best_acc": self.best_acc,
                "skipped_steps": self.skipped_steps, "rng": rngs, "world_size": self.env.world_size,
                "config": config_mod.to_dict(self.cfg), "wandb_id": self.wandb.run_id,
                "metrics": self.metrics.history, "finished": False, "precision": self.precision,
                "lookahead": self.lookahead.state_dict() if self.lookahead else {}}

    def _load_state(self, s: dict) -> None:
        checkpoint.check_compatible(s, self.cfg.model.name, self.cfg.data.dataset,
                                    {k: tuple(v.shape) for k, v in self.raw_model.state_dict().items()})
        self.raw_model.load_state_dict(s["model"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.schedule.load_state_dict(s["schedule"])
        self.scaler.load_state_dict(s["scaler"])
        if self.lookahead:
            self.lookahead.load_state_dict(s["lookahead"])
        self.step, self.epoch, self.epoch_step = s["step"], s["epoch"], s["epoch_step"]
        self.train_seconds, self.best_acc, self.skipped_steps = s["train_seconds"], s["best_acc"], s["skipped_steps"]
        self.wandb_id = s["wandb_id"]
        checkpoint.set_rng_state(s["rng"][self.env.rank % len(s["rng"])])
        self.metrics.restore(s["metrics"])
        self.metrics.write({"event": "resume", "step": self.step, "epoch": self.epoch,
                            "from": str(self.resume_path)})
        self.log(f"resumed from {self.resume_path} at step {self.step} (epoch {self.epoch + 1}, "
                 f"step {self.epoch_step} of {self.steps_per_epoch})")

    def save_checkpoint(self, is_best: bool = False, final: bool = False) -> None:
        """All ranks call this (RNG states are gathered); rank 0 writes while the others wait."""
        state = self._state()
        state["finished"] = final
        err = None
        if self.env.is_main:
            try:
                path = checkpoint.save(self.run_dir, state, self.cfg.ckpt.keep, is_best)
                self.metrics.write({"event": "checkpoint", "step": self.step, "path": str(path)})
            except OSError as e:
                err = f"checkpoint write failed at step {self.step} ({e.strerror or e}); the previous one is intact"
                self.log(f"warning: {err}")
        err = D.broadcast_object(err, self.env)
        if err and self.cfg.ckpt.on_write_error == "stop":
            raise TrainingFailed(err)
        self.last_ckpt_time = time.time()

    # ---- training ----------------------------------------------------------------------------
    def train_step(self, micro_batches) -> tuple[list[bool], torch.Tensor]:
        """One optimizer step over grad_accum micro-batches; returns the flags all ranks agree on
        ([non-finite, stop, checkpoint due]) and the loss."""
        model, accum = self.model, len(micro_batches)
        loss_sum = torch.zeros((), device=self.env.device)
        for i, (x, y) in enumerate(micro_batches):
            sync = i == accum - 1 or not isinstance(model, DDP)
            with (contextlib.nullcontext() if sync else model.no_sync()):
                with P.autocast(self.precision, self.env.device):
                    loss = F.cross_entropy(model(x), y, label_smoothing=self.cfg.optim.label_smoothing) / accum
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach().float()
        # One small all_reduce a step carries everything the ranks must agree on:
        # [any rank saw a non-finite loss, any rank got a stop signal, rank 0's clock says checkpoint].
        due = self.env.is_main and self.cfg.ckpt.every_minutes > 0 and \
            time.time() - self.last_ckpt_time >= 60 * self.cfg.ckpt.every_minutes
        flags = torch.stack([(~torch.isfinite(loss_sum)).float(),
                             torch.tensor(float(self.stop.requested), device=self.env.device),
                             torch.tensor(float(due), device=self.env.device)])
        flags = [f > 0 for f in D.all_reduce_sum(flags).tolist()]
        whiten = getattr(self.raw_model, "whiten", None)
        if whiten is not None and self.epoch >= self.cfg.model.freeze_whiten_bias_after:
            whiten.bias.grad = None  # airbench trains the whitening bias for the first epochs only
        if not flags[0] or self.precision == "fp16":  # a non-finite step is skipped; fp16's scaler skips by itself
            self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.step()
        return flags, loss_sum

    def fit(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        self.last_ckpt_time = time.time()
        if self.env.is_main:
            config_mod.save(cfg, self.run_dir / "config.json")
            self.log(f"run {self.run_dir}: {cfg.model.name} on {cfg.data.dataset}, world size {self.env.world_size} "
                     f"({self.env.backend}), {self.precision}, batch {t.batch_size} ({self.batch_per_rank}/rank), "
                     f"{self.loader_kind} pipeline, {self.total_steps} steps")
        last_eval = None
        while self.step < self.total_steps and self.epoch < t.epochs:
            if self.run_epoch():
                return {"stopped": True, "step": self.step}
            if self.epoch_step == self.steps_per_epoch:
                self.epoch, self.epoch_step = self.epoch + 1, 0
                if t.eval_every and self.epoch % t.eval_every == 0 or self.epoch == t.epochs:
                    last_eval = self.run_eval()
        if last_eval is None or last_eval["step"] != self.step:
            last_eval = self.run_eval()
        return self.finish(last_eval)

    def run_epoch(self) -> bool:
        """Train from the current position to the end of the epoch; True if a stop signal ended it."""
        t, accum = self.cfg.train, self.cfg.train.grad_accum
        batches = self.pipeline.epoch(self.epoch, self.epoch_step * accum)
        tick = time.perf_counter()
        interval_start, interval_steps, wait = tick, 0, 0.0
        while self.epoch_step < self.steps_per_epoch and self.step < self.total_steps:
            w0 = time.perf_counter()
            micro = [next(batches) for _ in range(accum)]
            wait += time.perf_counter() - w0
            flags, loss = self.train_step(micro)
            self.step, self.epoch_step, interval_steps = self.step + 1, self.epoch_step + 1, interval_steps + 1
            if self.lookahead:
                self.lookahead.step(self.step)
            self._guard_nonfinite(flags[0])
            if self.step % t.log_every == 0 or self.step == self.total_steps:
                now = time.perf_counter()
                self.train_seconds += now - tick
                self.log_train(float(loss), interval_steps, now - interval_start, wait)
                tick = interval_start = time.perf_counter()
                interval_steps, wait = 0, 0.0
            periodic = flags[2] or (self.cfg.ckpt.every_steps and self.step % self.cfg.ckpt.every_steps == 0)
            if flags[1] or (periodic and self.bad_steps == 0):  # never checkpoint weights mid-divergence
                self.train_seconds += time.perf_counter() - tick
                self.save_checkpoint()
                tick = time.perf_counter()
                if flags[1]:
                    return self.handle_stop()
        self.train_seconds += time.perf_counter() - tick
        return False

    def _guard_nonfinite(self, bad: bool) -> None:
        if not bad:
            self.bad_steps = 0
            return
        self.bad_steps += 1
        self.skipped_steps += 1
        self.metrics.write({"event": "nonfinite", "step": self.step, "consecutive": self.bad_steps})
        if self.precision != "fp16" and self.bad_steps >= self.cfg.train.nonfinite_patience:
            raise TrainingFailed(f"loss was NaN/Inf for {self.bad_steps} consecutive steps (step {self.step}); "
                                 f"lower --lr or check the data. The last good checkpoint is kept in {self.run_dir}")

    def log_train(self, loss: float, steps: int, seconds: float, wait: float) -> None:
        images = steps * self.cfg.train.batch_size
        ips = images / max(seconds, 1e-9)
        rec = {"event": "train", "epoch": self.epoch, "step": self.step, "loss": loss,
               "lr": self.schedule.get_last_lr()[0], "images_per_sec": ips,
               "images_per_sec_per_rank": ips / self.env.world_size, "data_wait_frac": wait / max(seconds, 1e-9),
               "epoch_seconds": self.steps_per_epoch * self.cfg.train.batch_size / max(ips, 1e-9),
               "eta_seconds": (self.total_steps - self.step) * self.cfg.train.batch_size / max(ips, 1e-9),
               "memory_mb": memory_mb(self.env.device)}
        if self.precision == "fp16":
            rec["scaler_scale"] = self.scaler.get_scale()
        self.metrics.write(rec)
        self.wandb.log_train(rec)
        self.progress.update(self.step, rec)

    def handle_stop(self) -> bool:
        requeue = D.broadcast_object(self.stop.wants_requeue, self.env)
        self.log(f"stop signal: checkpoint written at step {self.step}")
        self.wandb.finish()  # complete the W&B files inside the grace period; a requeue resumes the run
        failed = requeue and self.env.is_main and not requeue_slurm_job(self.log)
        if D.broadcast_object(failed, self.env):  # unfinished and not requeued: not a success
            raise TrainingFailed(f"stopped at step {self.step} and could not requeue; continue with "
                                 f"--out {self.run_dir} --resume auto")
        return True

    def run_eval(self) -> dict:
        d = self.data
        res = evaluate(self.model, d.test_x, d.test_y, num_classes=d.num_classes, normalize=self.normalize,
                       env=self.env, precision=self.precision, tta=self.cfg.train.tta)
        rec = {"event": "eval", "epoch": self.epoch, "step": self.step, **res, "train_seconds": self.train_seconds}
        self.metrics.write(rec)
        self.wandb.log_eval(rec, d.classes)
        self.log(f"epoch {self.epoch}: test accuracy {res['test_accuracy']:.4f} "
                 f"({res['test_correct']}/{res['test_total']}), {self.train_seconds:.1f} s of training")
        is_best = res["test_accuracy"] > self.best_acc
        self.best_acc = max(self.best_acc, res["test_accuracy"])
        if is_best:
            self.save_checkpoint(is_best=True)
        return rec

    def finish(self, ev: dict) -> dict:
        cfg, d = self.cfg, self.data
        self.save_checkpoint(final=True)
        trained = self.step * cfg.train.batch_size
        summary = {k: ev[k] for k in ("test_accuracy", "test_correct", "test_total", "per_class_accuracy")}
        summary.update({
            "classes": d.classes, "epochs": self.epoch, "steps": self.step, "world_size": self.env.world_size,
            "backend": self.env.backend, "per_rank_batch_size": self.batch_per_rank * cfg.train.grad_accum,
            "global_batch_size": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum,
            "train_seconds": self.train_seconds, "train_images_per_sec": trained / max(self.train_seconds, 1e-9),
            "model": cfg.model.name, "dataset": cfg.data.dataset, "precision": self.precision,
            "loader": self.loader_kind, "device": str(self.env.device), "skipped_steps": self.skipped_steps,
            "parameters": sum(p.numel() for p in self.raw_model.parameters()), "run_dir": str(self.run_dir)})
        if self.env.is_main:
            torch.save({"model": self.raw_model.state_dict(), "model_name": cfg.model.name, "classes": d.classes,
                        "in_channels": d.in_channels, "image_size": d.image_size,
                        "mean": self.mean, "std": self.std, "config": config_mod.to_dict(cfg)}, self.run_dir / "model.pt")
            write_json_atomic(self.run_dir / "summary.json", summary)
            self.wandb.finish(summary)
            self._report(summary)
        self.progress.close()
        return summary

    def _report(self, summary: dict) -> None:
        from .report import format_report, write_plots
        try:
            write_plots(self.run_dir)
        except Exception as e:  # plots are a convenience; the run's results are already written
            self.log(f"warning: plots not written: {e}")
        self.log(format_report(summary, self.metrics.history))


def train(cfg: Config) -> dict:
    env = D.setup(cfg.dist.backend, cfg.dist.timeout)
    try:
        result = Trainer(cfg, env).fit()
    except BaseException:
        D.teardown(graceful=False)
        raise
    D.teardown()
    return result
