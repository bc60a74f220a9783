"""The trainer's checkpoint components: what a training checkpoint holds, piece by piece.

torch objects own their state already (the model, the LR schedule, the EMA, the lookahead); the
classes here give the same state_dict()/load_state_dict() to what needs a word more (the optimizer's
momentum buffers, the loss scaler, every rank's RNG states) and to what is plain trainer fields (the
position in the data, the run's record, what the run is). checkpoint.assemble/restore turn the
mapping of training_components() into the checkpoint's dict and back; the keys are those earlier versions
wrote.
"""

from __future__ import annotations

import logging

import torch

from dist_cnn import config as config_mod
from dist_cnn.distributed import parallel
from dist_cnn.train import checkpoint, precision
from dist_cnn.train.checkpoint import Inline
from dist_cnn.train.optim import zero_momentum

log = logging.getLogger(__name__)


class OptimizerState:
    """The optimizer's state; after loading, every parameter has a momentum buffer (zero_momentum:
    a checkpoint written before the first step has none), and the optimizer steps as it was built
    here (fused or foreach: how this device steps, which a checkpoint's param groups would otherwise
    bring from the run that wrote it)."""

    IMPLEMENTATION = ("foreach", "fused")

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        built = [{k: g[k] for k in self.IMPLEMENTATION if k in g} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state)
        for group, implementation in zip(self.optimizer.param_groups, built):
            group.update(implementation)
        zero_momentum(self.optimizer)


class ScalerState:
    """fp16's loss scale; a checkpoint trained in another precision has none, and it starts fresh."""

    def __init__(self, scaler: torch.amp.GradScaler):
        self.scaler = scaler

    def state_dict(self) -> dict:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if not precision.load_scaler(self.scaler, state):
            log.info("the checkpoint was trained in another precision: fp16's loss scale starts fresh")


class RNGStates:
    """Every rank's RNG states (torch, Python, NumPy, CUDA), a list by rank: saving gathers them (all
    ranks call it), loading takes this rank's (rank modulo the list's length at another world size)."""

    def __init__(self, env):
        self.env = env

    def state_dict(self) -> list:
        mine = checkpoint.rng_state()
        if not self.env.initialized:
            return [mine]
        rngs = [None] * self.env.world_size
        torch.distributed.all_gather_object(rngs, mine)
        return rngs

    def load_state_dict(self, rngs: list) -> None:
        checkpoint.set_rng_state(rngs[self.env.rank % len(rngs)])


class Position:
    """Where training is: the optimizer step, and the epoch and the step in it. The data pipeline's
    order is a function of the epoch and its position a count of batches, so these restore it exactly
    mid-epoch (with the same global batch and training set: check_resumable)."""

    KEYS = ("step", "epoch", "epoch_step")

    def __init__(self, run):
        self.run = run

    def state_dict(self) -> dict:
        return {**{k: getattr(self.run, k) for k in self.KEYS}, "train_size": self.run.train_size}

    def load_state_dict(self, state: dict) -> None:
        for k in self.KEYS:
            setattr(self.run, k, state[k])


class Record:
    """What the run has accumulated: training time, the best score and which weights made it, skipped
    steps and images, the metrics history and the W&B run."""

    def __init__(self, run):
        self.run = run

    def state_dict(self) -> dict:
        run = self.run
        return {
            "train_seconds": run.meter.seconds,
            "best_acc": run.best_acc,
            "best_weights": run.best_weights,
            "skipped_steps": run.skipped_steps,
            "skipped_images": sorted(run.skipped_images),
            "metrics": run.metrics.history,
            "wandb_id": run.wandb.run_id,
        }

    def load_state_dict(self, state: dict) -> None:
        run = self.run
        run.meter.seconds = state["train_seconds"]
        run.best_acc, run.best_weights = state["best_acc"], state.get("best_weights", "model")
        run.skipped_steps, run.skipped_images = state["skipped_steps"], set(state.get("skipped_images", []))
        run.metrics.history = list(state["metrics"])
        run.wandb_id = state["wandb_id"]  # the W&B logger is built after the restore, to continue this run


class ModelInfo:
    """What rebuilds the model without the dataset (dist-cnn predict, export, eval): its spec, classes,
    input shape, normalization, loader and config. Read by those commands; setup reads the config,
    and resume takes nothing from here."""

    def __init__(self, run):
        self.run = run

    def state_dict(self) -> dict:
        run, data = self.run, self.run.data
        return {
            "model_name": run.cfg.model.name,
            "classes": data.classes,
            "in_channels": data.in_channels,
            "image_size": data.image_size,
            "loader": run.loader_kind,
            "mean": run.mean,
            "std": run.std,
            "config": config_mod.to_dict(run.cfg),
        }

    def load_state_dict(self, state: dict) -> None:
        pass


class Setup:
    """How the run executes: world size, precision, comm hook; `finished` marks the final checkpoint.
    Setup reads the precision before the components exist; resume takes nothing from here."""

    def __init__(self, run, finished: bool = False):
        self.run, self.finished = run, finished

    def state_dict(self) -> dict:
        run = self.run
        return {
            "world_size": run.env.world_size,
            "precision": run.precision,
            "comm_hook": parallel.comm_hook_record(run.cfg.model, run.env.world_size),
            "finished": self.finished,
        }

    def load_state_dict(self, state: dict) -> None:
        pass


def training_components(run, finished: bool = False) -> dict:
    """A training checkpoint's components, for the trainer `run` (checkpoint.assemble/restore)."""
    parts = {
        "model": run.raw_model,
        "optimizer": OptimizerState(run.optimizer),
        "schedule": run.schedule,
        "scaler": ScalerState(run.scaler),
        "position": Inline(Position(run)),
        "record": Inline(Record(run)),
        "info": Inline(ModelInfo(run)),
        "setup": Inline(Setup(run, finished)),
    }
    if run.ema:
        parts["ema"] = run.ema
    if run.lookahead:
        parts["lookahead"] = run.lookahead
    parts["rng"] = RNGStates(run.env)  # last: nothing restored after it draws from the generators
    return parts


def export_components(run) -> dict:
    """model.pt: the weights (and the EMA's, plain) with what rebuilds the model, nothing to resume."""
    parts = {"model": run.raw_model, "info": Inline(ModelInfo(run))}
    if run.ema:
        parts["ema"] = run.ema.module
    return parts
