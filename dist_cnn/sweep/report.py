"""`dist-cnn sweep report DIR`: the trials sorted by the objective, best.toml (the best trial's config as a
plain run: `train.py --config best.toml` trains it again), and Optuna's matplotlib plots as PNGs."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from dist_cnn import config as config_mod
from dist_cnn.errors import one_line
from dist_cnn.sweep import tomlfile
from dist_cnn.sweep.trialfiles import TrialFiles, rerun_config

log = logging.getLogger(__name__)

PLOTS = {
    "optimization_history": "plot_optimization_history",
    "param_importances": "plot_param_importances",
    "parallel_coordinate": "plot_parallel_coordinate",
    "intermediate_values": "plot_intermediate_values",
}


def _seconds(t) -> float | None:
    if t.datetime_start is None or t.datetime_complete is None:
        return None
    return (t.datetime_complete - t.datetime_start).total_seconds()


def sorted_trials(study) -> list:
    """Complete trials best first, then pruned, running and failed ones, each by number."""
    sign = -1 if study.direction.name == "MAXIMIZE" else 1
    order = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "WAITING": 3, "FAIL": 4}

    def key(t):
        value = t.value * sign if t.value is not None else math.inf
        return order.get(t.state.name, 5), value, t.number

    return sorted(study.get_trials(deepcopy=False), key=key)


def _cell(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def table(study, objective: str) -> str:
    trials = sorted_trials(study)
    keys = sorted({k for t in trials for k in t.params})
    head = ["trial", *keys, objective, "state", "seconds", "error"]
    rows = [
        [
            str(t.number),
            *(_cell(t.params[k]) if k in t.params else "-" for k in keys),
            _cell(t.value) if t.value is not None else "-",
            t.state.name.lower(),
            f"{s:.0f}" if (s := _seconds(t)) is not None else "-",
            t.user_attrs.get("error", ""),
        ]
        for t in trials
    ]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows])


def write_best(out: Path, study) -> Path | None:
    """best.toml from the best complete trial's own config file; None while no trial is complete."""
    complete = [t for t in sorted_trials(study) if t.state.name == "COMPLETE"]
    if not complete:
        return None
    best = complete[0]
    cfg = config_mod.load_file(str(TrialFiles(out, best.number).config))
    path = out / "best.toml"
    tomlfile.write(path, rerun_config(cfg), header=f"sweep {study.study_name}: trial {best.number}, value {best.value}")
    return path


def write_plots(out: Path, study) -> list[Path]:
    """Optuna's plots that the study has data for; a plot that cannot be drawn is a warning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as vis

    written = []
    (out / "plots").mkdir(exist_ok=True)
    for name, fn in PLOTS.items():
        try:
            ax = getattr(vis, fn)(study)
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            path = out / "plots" / f"{name}.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(fig)
            written.append(path)
        except Exception as e:  # e.g. importances need two complete trials
            log.info(f"note: {name} not drawn ({one_line(e)})")
    return written


def report(out: Path, study, objective: str) -> None:
    log.info(table(study, objective))
    best = write_best(out, study)
    log.info(f"best: {best} (train.py --config {best})" if best else "best: no complete trial yet")
    plots = write_plots(out, study)
    if plots:
        log.info(f"plots: {', '.join(str(p) for p in plots)}")
