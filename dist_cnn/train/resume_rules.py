"""What a resumed run may change, and what it takes from its checkpoint.

A resumed run must compute what the uninterrupted run would have: same data order, same arithmetic,
same optimizer. So every option that decides the results is fixed at the start of the run. On resume:
- an option in MAY_CHANGE takes this command line's value: how the run is executed (world size is
  not an option, grad accumulation, workers, backend, timeout), how long it trains (epochs,
  max steps), where the data lives, and how it is logged and checkpointed;
- any other option takes the checkpoint's value. Given on the command line (or in --config) with
  another value, it is one line naming the option and both values, before anything else happens.
So config.json, W&B and the checkpoints always record the values the run uses.
"""

from __future__ import annotations

from dataclasses import fields

from dist_cnn import config as config_mod
from dist_cnn.config import Config
from dist_cnn.errors import UserError

MAY_CHANGE = frozenset(
    {
        "data.data_dir",
        "data.download",
        "data.workers",
        "train.epochs",
        "train.max_steps",
        "train.grad_accum",
        "train.eval_every",
        "train.log_every",
        "train.nonfinite_patience",
        "train.malloc_tune",
        "model.compile",
        "dist.backend",
        "dist.timeout",
        "ckpt.resume",
        "ckpt.keep",
        "ckpt.every_steps",
        "ckpt.every_minutes",
        "ckpt.on_write_error",
        *(f"log.{f.name}" for f in fields(config_mod.LogConfig)),
    }
)


FIRST = ("model.name", "data.dataset")  # the checkpoint's identity: named first when several differ


def fixed_options() -> list[str]:
    """Every option that may not change on resume, as section.name (model and dataset first)."""
    keys = [
        f"{section}.{f.name}"
        for section, cls in config_mod.sections()
        for f in fields(cls)
        if f"{section}.{f.name}" not in MAY_CHANGE
    ]
    return [*FIRST, *(k for k in keys if k not in FIRST)]


def _flag(key: str) -> str:
    section, name = key.split(".")
    cls = dict(config_mod.sections())[section]
    return config_mod.flag_name(next(f for f in fields(cls) if f.name == name))


def _show(value) -> str:
    return repr(value) if isinstance(value, str) and (not value or " " in value) else str(value)


def reconcile(cfg: Config, recorded: dict, explicit: set[str], resolved: dict | None = None) -> None:
    """Make cfg the resumed run's configuration: fixed options from `recorded` (the checkpoint's
    config), refusing one given with another value. resolved: what a recorded `auto` resolved to
    ({"train.precision": "bf16", "data.loader": "device"}): naming that value is no change."""
    for key in fixed_options():
        section, name = key.split(".")
        stored = recorded.get(section, {})
        if not isinstance(stored, dict) or name not in stored:
            continue  # a checkpoint of an older version without this option: this run's value
        old, new = stored[name], getattr(getattr(cfg, section), name)
        same = old == new or (old == "auto" and new == (resolved or {}).get(key))
        if key in explicit and not same:
            flag = _flag(key)
            raise UserError(
                f"the checkpoint is for {flag} {_show(old)}, this run has {flag} {_show(new)}: "
                f"{flag} cannot change on resume (it changes the results); leave it out to continue with "
                f"{_show(old)}, or start a new run in another --out"
            )
        setattr(getattr(cfg, section), name, old)
