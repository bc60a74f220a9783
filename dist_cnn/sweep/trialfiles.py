"""A trial's files under the sweep directory:

    trials/NNNN.toml   its config: the base options with the trial's values (`train.py --config` reads it)
    trials/NNNN.json   where rank 0 reports to: the study's storage and name, the trial's id and objective
    trials/NNNN.log    the run's output (torchrun's, or the SLURM job's)
    trials/NNNN.job    the SLURM job id (--launch slurm)
    trials/NNNN/       the run directory (checkpoints, metrics.jsonl, summary.json)

The run directory is the truth about how a trial ended: summary.json (complete), a "pruned" event in
metrics.jsonl (pruned), or neither (failed, or unfinished: it resumes from its checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from dist_cnn.fileio import write_json_atomic
from dist_cnn.sweep import tomlfile

TRIAL_ENV = "DIST_CNN_SWEEP_TRIAL"  # the path of trials/NNNN.json, for the run's rank 0
ERROR_LINE = re.compile(r"^(?:\[rank \d+\] )?error: (.+)$", re.M)


@dataclass
class TrialFiles:
    root: Path  # the sweep directory
    number: int

    @property
    def stem(self) -> Path:
        return self.root / "trials" / f"{self.number:04d}"

    config = property(lambda self: self.stem.with_suffix(".toml"))
    link = property(lambda self: self.stem.with_suffix(".json"))
    log = property(lambda self: self.stem.with_suffix(".log"))
    job = property(lambda self: self.stem.with_suffix(".job"))
    run_dir = property(lambda self: self.stem)


def trial_config(base: dict, params: dict, files: TrialFiles, sweep_name: str) -> dict:
    """The base config with the trial's values and its run directory; resumed whenever restarted."""
    cfg = json.loads(json.dumps(base))
    for key, value in params.items():
        section, name = key.split(".", 1)
        cfg[section][name] = value
    cfg["log"].update(out=str(files.run_dir.resolve()), run_name=f"{sweep_name}-{files.number:04d}", progress=False)
    cfg["log"]["wandb_group"] = cfg["log"]["wandb_group"] or sweep_name
    cfg["ckpt"]["resume"] = "auto"
    return cfg


def write_trial(files: TrialFiles, cfg: dict, link: dict) -> None:
    """Written once per trial, before its first launch; a restart reuses them as they are."""
    files.stem.parent.mkdir(parents=True, exist_ok=True)
    if not files.config.exists():
        tomlfile.write(files.config, cfg, header=f"sweep trial {files.number}: {link['params']}")
    write_json_atomic(files.link, link)


def rerun_config(cfg: dict) -> dict:
    """A trial's config as a plain run of it: the sweep's own settings back to their defaults."""
    out = json.loads(json.dumps(cfg))
    defaults = {("log", "out"): "", ("ckpt", "resume"): "none", ("log", "run_name"): "", ("log", "progress"): True}
    for (section, name), value in defaults.items():
        out[section][name] = value
    return out


def read_events(run_dir: Path, event: str) -> list[dict]:
    with contextlib.suppress(FileNotFoundError):
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return [r for r in (json.loads(x) for x in lines if x.strip()) if r.get("event") == event]
    return []


def outcome(files: TrialFiles) -> tuple[str, dict | None]:
    """('complete', summary), ('pruned', the pruned event) or ('unfinished', None)."""
    summary = files.run_dir / "summary.json"
    if summary.is_file():
        return "complete", json.loads(summary.read_text())
    pruned = read_events(files.run_dir, "pruned")
    if pruned:
        return "pruned", pruned[-1]
    return "unfinished", None


def error_line(files: TrialFiles, fallback: str) -> str:
    """The run's own one-line error from its log (the first, which caused the others), or `fallback`."""
    with contextlib.suppress(OSError):
        found = ERROR_LINE.search(files.log.read_text(errors="replace"))
        if found:
            return found.group(1).strip()
    return fallback
