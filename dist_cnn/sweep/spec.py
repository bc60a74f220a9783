"""The sweep spec: a config file (TOML, YAML or JSON) whose sections are the base training options and
whose [sweep] table says what to search, for what, and how.

    [data]
    dataset = "synthetic"
    [sweep]
    trials = 6
    objective = "test_accuracy"          # a metric every run records (summary.json)
    direction = "maximize"               # default: maximize accuracies and rates, minimize seconds
    sampler = "tpe"                      # tpe, random or grid
    pruner = "median"                    # median, hyperband or none; or { name = "median", n_startup_trials = 2 }
    seed = 0                             # the sampler's seed
    config = "base.toml"                 # optional: a config file under the sections (relative to the spec)
    args = ["--epochs", "2"]             # optional: train.py flags over both
    enqueue = [{ "optim.lr" = 0.08 }]    # optional: trials to run first, with these values
    [sweep.space]
    "optim.lr" = { low = 0.01, high = 1.0, log = true }
    "train.epochs" = { low = 1, high = 4, step = 1 }     # an int or float range (step: a grid of it)
    "train.batch_size" = { choices = [32, 64] }

Every option is checked against the config field's own validation (dist_cnn.config) before any
trial starts; a bad spec is one line and exit code 2.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from dist_cnn import config as config_mod
from dist_cnn.errors import UserError

# Metrics that summary.json records, and the direction that is better; the ones also in every
# evaluation record are reported to the pruner as the run goes.
OBJECTIVES = {
    "test_accuracy": "maximize",
    "test_correct": "maximize",
    "ema_test_accuracy": "maximize",
    "train_seconds": "minimize",
    "train_images_per_sec": "maximize",
}
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("median", "hyperband", "none")
SWEEP_KEYS = {"trials", "objective", "direction", "sampler", "pruner", "seed", "config", "args", "enqueue", "space"}


@dataclass
class Dim:
    """One searched option: a range (low..high, maybe log scale or stepped) or a list of choices."""

    key: str  # "optim.lr"
    kind: str  # "float", "int" or "choices"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: list = field(default_factory=list)

    def grid(self) -> list:
        if self.kind == "choices":
            return list(self.choices)
        if self.step is None:
            raise UserError(f"sweep.space.{self.key}: the grid sampler needs choices or a range with a step")
        n = int(round((self.high - self.low) / self.step))
        return [self.low + i * self.step for i in range(n + 1)]


@dataclass
class Spec:
    base: dict  # the trials' common config, as {section: {key: value}} (every field)
    space: list[Dim]
    trials: int = 10
    objective: str = "test_accuracy"
    direction: str = "maximize"
    sampler: str = "tpe"
    pruner: dict = field(default_factory=lambda: {"name": "median"})
    seed: int = 0
    enqueue: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "base": self.base,
            "space": [vars(d) for d in self.space],
            "trials": self.trials,
            "objective": self.objective,
            "direction": self.direction,
            "sampler": self.sampler,
            "pruner": self.pruner,
            "seed": self.seed,
            "enqueue": self.enqueue,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Spec:
        return cls(**{**d, "space": [Dim(**x) for x in d["space"]]})


def _field(key: str):
    """(section, dataclass field, type) of 'section.name', or a one-line error."""
    found = config_mod.option_field(key)
    if found is None:
        raise UserError(f"sweep.space: unknown option {key!r} (options are SECTION.FIELD, e.g. optim.lr)")
    return found


def _check_value(cfg: config_mod.Config, key: str, value) -> None:
    """The option's own validation, on a copy of the base config with this value."""
    _field(key)
    try:
        config_mod.with_option(cfg, key, value)
    except UserError as e:
        raise UserError(f"sweep.space.{key}: {e}") from None


def _dim(cfg: config_mod.Config, key: str, d) -> Dim:
    section, f, typ = _field(key)
    where = f"sweep.space.{key}"
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a table, {{ low = ..., high = ... }} or {{ choices = [...] }}")
    unknown = set(d) - {"low", "high", "log", "step", "choices"}
    if unknown:
        raise UserError(f"{where}: unknown key {sorted(unknown)[0]!r} (low, high, log, step or choices)")
    if "choices" in d:
        if set(d) != {"choices"} or not isinstance(d["choices"], list) or not d["choices"]:
            raise UserError(f"{where}: choices must be a non-empty list, and alone")
        for v in d["choices"]:
            _check_value(cfg, key, v)
        return Dim(key, "choices", choices=[float(v) if typ is float else v for v in d["choices"]])
    if typ not in (int, float):
        raise UserError(f"{where}: {config_mod.flag_of(f)} is not a number: give choices = [...]")
    if "low" not in d or "high" not in d:
        raise UserError(f"{where}: a range needs both low and high")
    low, high, log, step = d["low"], d["high"], d.get("log", False), d.get("step")
    for v in (low, high):
        _check_value(cfg, key, v)
    low, high = typ(low), typ(high)
    if not low < high:
        raise UserError(f"{where}: low must be smaller than high, got {low} and {high}")
    if not isinstance(log, bool):
        raise UserError(f"{where}: log must be true or false")
    if log and low <= 0:
        raise UserError(f"{where}: a log-scale range needs low > 0, got {low}")
    if step is not None:
        if log or isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0:
            raise UserError(f"{where}: step must be a positive number, and not with log")
        if typ is int and not isinstance(step, int):
            raise UserError(f"{where}: {config_mod.flag_of(f)} is an integer: step must be one too")
    return Dim(key, "int" if typ is int else "float", low, high, log, step)


def _pruner(value) -> dict:
    p = {"name": value} if isinstance(value, str) else value
    if not isinstance(p, dict) or p.get("name") not in PRUNERS:
        raise UserError(f"sweep.pruner must be one of {', '.join(PRUNERS)} (or a table with name = one of them)")
    return dict(p)


def _base_config(data: dict, sweep: dict, spec_path: Path) -> config_mod.Config:
    """Defaults < sweep.config file < the spec's own sections < sweep.args flags."""
    cfg = config_mod.Config()
    if "config" in sweep:
        if not isinstance(sweep["config"], str):
            raise UserError("sweep.config must be a file name")
        path = spec_path.parent / sweep["config"]
        config_mod.apply_dict(cfg, config_mod.load_file(str(path)), where=f"config file {path}")
    config_mod.apply_dict(cfg, data, where=f"sweep spec {spec_path}")
    args = sweep.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise UserError("sweep.args must be a list of train.py flags (strings)")
    ns = config_mod.train_parser("sweep.args").parse_args(args)
    nested: dict = {}
    for key, value in vars(ns).items():
        if "." in key:
            section, name = key.split(".", 1)
            nested.setdefault(section, {})[name] = value
    config_mod.apply_dict(cfg, nested, where="sweep.args")
    config_mod.validate(cfg)
    return cfg


def _int(sweep: dict, key: str, default: int, low: int) -> int:
    v = sweep.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise UserError(f"sweep.{key} must be an integer >= {low}, got {v!r}")
    return v


def load(path: str) -> Spec:
    """The spec file, checked whole: every error is one line (UserError) before anything runs."""
    data = config_mod.load_file(path)
    sweep = data.pop("sweep", None)
    if not isinstance(sweep, dict):
        raise UserError(f"sweep spec {path}: no [sweep] table (what to search: [sweep.space])")
    unknown = set(sweep) - SWEEP_KEYS
    if unknown:
        raise UserError(f"sweep.{sorted(unknown)[0]}: unknown key (known: {', '.join(sorted(SWEEP_KEYS))})")
    cfg = _base_config(data, sweep, Path(path))
    space = sweep.get("space")
    if not isinstance(space, dict) or not space:
        raise UserError("sweep.space must be a table of at least one option to search")
    dims = [_dim(cfg, key, d) for key, d in space.items()]
    objective = sweep.get("objective", "test_accuracy")
    if objective not in OBJECTIVES:
        raise UserError(f"sweep.objective {objective!r} is not a recorded metric (one of {', '.join(OBJECTIVES)})")
    if objective.startswith("ema_") and not cfg.train.model_ema:
        raise UserError(f"sweep.objective {objective} is recorded only with train.model_ema = true")
    direction = sweep.get("direction", OBJECTIVES[objective])
    if direction not in ("maximize", "minimize"):
        raise UserError(f"sweep.direction must be maximize or minimize, got {direction!r}")
    sampler = sweep.get("sampler", "tpe")
    if sampler not in SAMPLERS:
        raise UserError(f"sweep.sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if sampler == "grid":
        for d in dims:
            d.grid()
    enqueue = sweep.get("enqueue", [])
    if not isinstance(enqueue, list) or not all(isinstance(e, dict) for e in enqueue):
        raise UserError("sweep.enqueue must be a list of tables of option values")
    for e in enqueue:
        for key, v in e.items():
            _check_value(cfg, key, v)
    return Spec(
        base=config_mod.to_dict(cfg),
        space=dims,
        trials=_int(sweep, "trials", 10, 1),
        objective=objective,
        direction=direction,
        sampler=sampler,
        pruner=_pruner(sweep.get("pruner", "median")),
        seed=_int(sweep, "seed", 0, 0),
        enqueue=enqueue,
    )
