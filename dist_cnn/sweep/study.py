"""The Optuna study of a sweep directory: its storage, sampler and pruner, and sweep.json, which keeps
the study's name, storage and spec so that the same command run again continues the same study."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from dist_cnn.errors import UserError
from dist_cnn.fileio import write_json_atomic
from dist_cnn.sweep.spec import Dim, Spec

JOURNAL = "journal.log"
SWEEP_JSON = "sweep.json"


def storage(url: str):
    """'journal:PATH' (Optuna's journal file, many processes and nodes on a shared filesystem) or an
    RDB URL (sqlite:///x.db, postgresql://...)."""
    import optuna

    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url.removeprefix("journal:")))
    return optuna.storages.RDBStorage(url)


def sampler(spec: Spec):
    import optuna

    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    if spec.sampler == "grid":
        return optuna.samplers.GridSampler({d.key: d.grid() for d in spec.space}, seed=spec.seed)
    return optuna.samplers.TPESampler(seed=spec.seed)


def pruner(spec: dict):
    """The pruner of a spec's `pruner` table: {"name": "median", **its arguments}."""
    import optuna

    kwargs = {k: v for k, v in spec.items() if k != "name"}
    cls = {
        "median": optuna.pruners.MedianPruner,
        "hyperband": optuna.pruners.HyperbandPruner,
        "none": optuna.pruners.NopPruner,
    }[spec["name"]]
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"sweep.pruner: {e}") from None


def suggest(trial, d: Dim):
    """The trial's value of one option, decided by the sampler."""
    if d.kind == "choices":
        return trial.suggest_categorical(d.key, d.choices)
    if d.kind == "int":
        return trial.suggest_int(d.key, d.low, d.high, step=d.step or 1, log=d.log)
    return trial.suggest_float(d.key, d.low, d.high, step=d.step, log=d.log)


def quiet() -> None:
    import optuna

    optuna.logging.set_verbosity(logging.WARNING)  # the driver logs each trial itself


def open_sweep(out: Path, spec: Spec, storage_url: str | None, name: str | None):
    """Create or continue the sweep in `out`; returns (optuna study, its record from sweep.json)."""
    import optuna

    quiet()
    record_path = out / SWEEP_JSON
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record["spec"] != json.loads(json.dumps(spec.to_dict())):
            raise UserError(f"--out {out} holds a sweep of another spec; give the same spec, or another --out")
        if storage_url and storage_url != record["storage"]:
            raise UserError(f"--out {out}: its study is stored in {record['storage']}, not {storage_url}")
        if name and name != record["name"]:
            raise UserError(f"--out {out}: its study is named {record['name']}, not {name}")
    else:
        out.mkdir(parents=True, exist_ok=True)
        url = storage_url or f"journal:{(out / JOURNAL).resolve()}"
        record = {"name": name or out.resolve().name, "storage": url, "spec": spec.to_dict()}
        write_json_atomic(record_path, record)
    study = optuna.create_study(
        study_name=record["name"],
        storage=storage(record["storage"]),
        sampler=sampler(spec),
        pruner=pruner(spec.pruner),
        direction=spec.direction,
        load_if_exists=True,
    )
    if not study.get_trials(deepcopy=False):
        for params in spec.enqueue:
            study.enqueue_trial(params)
    return study, record


def load_sweep(out: Path):
    """(study, record) of an existing sweep directory, for the report."""
    import optuna

    quiet()
    record_path = out / SWEEP_JSON
    if not record_path.is_file():
        raise UserError(f"{out} is not a sweep directory (no {SWEEP_JSON})")
    record = json.loads(record_path.read_text())
    return optuna.load_study(study_name=record["name"], storage=storage(record["storage"])), record
