"""`dist-cnn report RUN_DIR`: plots and a plain-text report from a run directory.

Reads only the run directory's public files (metrics.jsonl, summary.json, config.json), so it works
on finished runs, on runs that were killed (no summary.json, a truncated last metrics line) and on
runs copied off the cluster.  Plots are drawn with matplotlib's Agg canvas (no display, no pyplot
global state) and written atomically next to the metrics: loss.png, accuracy.png,
confusion_matrix.png, and rank_times.png (where each rank's step time went, rank_times).
"""

from __future__ import annotations

import json
from pathlib import Path

from dist_cnn.errors import UserError, one_line
from dist_cnn.fileio import atomic_write
from dist_cnn.observability.format import class_names, display_names, duration, is_number, percent
from dist_cnn.observability.rank_times import LABELS, PARTS

PLOT_NAMES = ("loss.png", "accuracy.png", "confusion_matrix.png", "rank_times.png")
ANNOTATE_MAX_CLASSES = 20  # counts are written into the confusion-matrix cells up to this many classes
TICK_LABEL_MAX_CLASSES = 100  # class names on the axes up to this many classes


# --------------------------------------------------------------------------- reading


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """(records, number of unreadable lines skipped). A truncated last line from a killed run is
    the usual unreadable line; one in the middle (a killed run appended to later) is skipped too."""
    records, bad = [], 0
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return [], 0
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    return records, bad


def check_run_dir(run_dir) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory not found: {run_dir}")
    return run_dir


def read_metrics(run_dir) -> list[dict]:
    """The events of run_dir/metrics.jsonl in file order ([] when there is none yet).

    Unreadable lines (a truncated last line from a killed run) are skipped.
    """
    return read_jsonl(check_run_dir(run_dir) / "metrics.jsonl")[0]


def read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not valid JSON ({one_line(e)})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def _events(metrics: list[dict], event: str, key: str) -> list[dict]:
    """Events of one kind, the latest record per `key` (a resumed run may repeat steps), sorted."""
    latest: dict = {}
    for r in metrics:
        if r.get("event") == event and is_number(r.get(key)):
            latest[r[key]] = r
    return [latest[k] for k in sorted(latest)]


# --------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda f: fig.savefig(f, format="png", metadata={"Software": None}))
    return path


def _plot_loss(train: list[dict], path: Path, title: str) -> Path:
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    steps = [r["step"] for r in train]
    ax.plot(steps, [r.get("loss", float("nan")) for r in train], color="tab:blue", label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("train loss", color="tab:blue")
    ax.tick_params(axis="y", labelcolor="tab:blue")
    ax.grid(alpha=0.3)
    if any(is_number(r.get("lr")) for r in train):
        ax2 = ax.twinx()
        ax2.plot(steps, [r.get("lr", float("nan")) for r in train], color="tab:orange", label="learning rate")
        ax2.set_ylabel("learning rate", color="tab:orange")
        ax2.tick_params(axis="y", labelcolor="tab:orange")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def _plot_accuracy(evals: list[dict], path: Path, title: str) -> Path:
    fig = _figure(6.5, 4.5)
    ax = fig.add_subplot()
    epochs = [r["epoch"] for r in evals]
    acc = [100.0 * r.get("test_accuracy", float("nan")) for r in evals]
    ax.plot(epochs, acc, marker="o", color="tab:green")
    last = evals[-1]
    if is_number(last.get("test_accuracy")):
        ax.annotate(
            f"{100 * last['test_accuracy']:.2f}%",
            (epochs[-1], acc[-1]),
            textcoords="offset points",
            xytext=(0, 8),
            ha="center",
        )
    ax.margins(x=0.06, y=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    if len(epochs) <= 20:
        ax.set_xticks(epochs)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(matrix: list[list[int]], names: list[str], path: Path, title: str) -> Path:
    import numpy as np

    m = np.asarray(matrix, dtype=float)
    n = m.shape[0]
    size = 7.0 if n <= 10 else min(0.45 * n + 2.5, 0.16 * n + 6.0, 22.0)
    fig = _figure(size, size * 0.9)
    ax = fig.add_subplot()
    # colour by the share of each true class (row), so classes of different sizes compare
    row_sums = m.sum(axis=1, keepdims=True)
    share = np.divide(m, row_sums, out=np.zeros_like(m), where=row_sums > 0)
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    if n <= TICK_LABEL_MAX_CLASSES:
        fontsize = 9 if n <= 20 else 7 if n <= 50 else 5
        ax.set_xticks(
            range(n), names, rotation=90 if n > 10 else 45, ha="right" if n <= 10 else "center", fontsize=fontsize
        )
        ax.set_yticks(range(n), names, fontsize=fontsize)
    if n <= ANNOTATE_MAX_CLASSES:
        for i in range(n):
            for j in range(n):
                ax.text(
                    j,
                    i,
                    f"{int(m[i, j])}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if share[i, j] > 0.5 else "black",
                )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def rank_breakdown(train: list[dict]) -> dict[str, list[float]] | None:
    """Each rank's mean ms/step of each part over the logged intervals (the first interval, which
    holds start-up, is left out when there are others); None for runs logged without the fields."""
    keys = [f"rank_{p}_ms" for p in PARTS]
    rows = [r for r in train if all(isinstance(r.get(k), list) and r[k] for k in keys)]
    rows = rows[1:] or rows
    if not rows or len({len(r[k]) for r in rows for k in keys}) != 1:
        return None
    return {p: [sum(r[k][i] for r in rows) / len(rows) for i in range(len(rows[0][k]))] for p, k in zip(PARTS, keys)}


def _plot_rank_times(breakdown: dict[str, list[float]], path: Path, title: str) -> Path:
    world = len(next(iter(breakdown.values())))
    fig = _figure(8, 2.2 + 0.45 * min(world, 64))
    ax = fig.add_subplot()
    left = [0.0] * world
    for part, values in breakdown.items():
        ax.barh(range(world), values, left=left, label=LABELS[part])
        left = [a + b for a, b in zip(left, values)]
    ax.set_yticks(range(world), [f"rank {r}" for r in range(world)] if world <= 64 else None)
    ax.invert_yaxis()
    ax.set_xlabel("ms per optimizer step (mean over the logged intervals)")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=4, fontsize=8, frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def write_plots(run_dir) -> list[Path]:
    """(Re-)render the PNGs that the run's metrics allow; returns their paths.

    loss.png needs train events, accuracy.png eval events, confusion_matrix.png an eval event with
    a confusion matrix (the last one), rank_times.png train events with the per-rank time fields.
    Class names come from summary.json when present.
    """
    run_dir = check_run_dir(run_dir)
    metrics = read_metrics(run_dir)
    summary = read_json(run_dir / "summary.json")
    config = read_json(run_dir / "config.json")
    label = _run_label(summary, config)
    written = []
    train = _events(metrics, "train", "step")
    if train:
        written.append(_plot_loss(train, run_dir / "loss.png", f"train loss and learning rate{label}"))
    evals = _events(metrics, "eval", "epoch")
    if evals:
        written.append(_plot_accuracy(evals, run_dir / "accuracy.png", f"test accuracy{label}"))
    with_matrix = [r for r in evals if isinstance(r.get("confusion_matrix"), list) and r["confusion_matrix"]]
    if with_matrix:
        last = with_matrix[-1]
        matrix = last["confusion_matrix"]
        names = class_names(summary.get("classes"), len(matrix))
        title = f"confusion matrix, epoch {last['epoch']}{label}"
        written.append(plot_confusion(matrix, names, run_dir / "confusion_matrix.png", title))
    breakdown = rank_breakdown(train)
    if breakdown:
        title = f"where each rank's step time went{label}"
        written.append(_plot_rank_times(breakdown, run_dir / "rank_times.png", title))
    return written


def _run_label(summary: dict, config: dict) -> str:
    model = summary.get("model") or (config.get("model") or {}).get("name")
    dataset = summary.get("dataset") or (config.get("data") or {}).get("dataset")
    parts = [p for p in (model, dataset) if p]
    return f" ({' / '.join(parts)})" if parts else ""


# --------------------------------------------------------------------------- text report


def _mean(values) -> float | None:
    values = [v for v in values if is_number(v)]
    return sum(values) / len(values) if values else None


def format_report(summary: dict, metrics, config: dict | None = None) -> str:
    """A short plain-text report. `summary` may be {} (a killed run): the last eval event and the
    train events then stand in for it, and the report says the run did not finish."""
    summary = dict(summary or {})
    metrics = list(metrics or [])
    config = config or {}
    evals = _events(metrics, "eval", "epoch")
    train = _events(metrics, "train", "step")
    last_eval = evals[-1] if evals else {}

    def pick(key, *fallbacks):
        for source in (summary, *fallbacks):
            if source.get(key) is not None:
                return source[key]
        return None

    lines = []
    if not summary:
        lines.append("run did not finish (no summary.json): numbers below are from the last logged events")
    model = pick("model") or (config.get("model") or {}).get("name") or "?"
    dataset = pick("dataset") or (config.get("data") or {}).get("dataset") or "?"
    precision = pick("precision") or (config.get("train") or {}).get("precision") or "?"
    world = pick("world_size")
    backend = pick("backend")
    lines.append(f"model: {model}   dataset: {dataset}   precision: {precision}")
    world_text = f"world size: {world if world is not None else '?'}"
    if backend:
        world_text += f" ({backend})"
    gbs, rbs = pick("global_batch_size"), pick("per_rank_batch_size")
    if gbs is not None:
        world_text += f"   batch: {gbs} global" + (f", {rbs} per rank" if rbs is not None else "")
    lines.append(world_text)
    epochs = pick("epochs_trained")  # fractional (--epochs 9.9); older runs only have completed epochs
    epochs = f"{epochs:g}" if is_number(epochs) else pick("epochs", last_eval)
    steps = pick("steps") if summary.get("steps") is not None else (train[-1]["step"] if train else None)
    if epochs is not None or steps is not None:
        lines.append(f"epochs: {epochs if epochs is not None else '?'}   steps: {steps if steps is not None else '?'}")

    acc = pick("test_accuracy", last_eval)
    correct, total = pick("test_correct", last_eval), pick("test_total", last_eval)
    if is_number(acc):
        counts = f" ({correct}/{total})" if correct is not None and total is not None else ""
        lines.append(f"test accuracy: {100 * acc:.2f}%{counts}")
    else:
        lines.append("test accuracy: not evaluated")

    seconds = pick("train_seconds", last_eval)
    if is_number(seconds):
        lines.append(f"training time: {duration(seconds)} ({seconds:.1f} s)")
    ips = summary.get("train_images_per_sec")
    if not is_number(ips):
        ips = _mean(r.get("images_per_sec") for r in train)
    if is_number(ips):
        per_rank = None
        if is_number(world) and world > 0:
            per_rank = ips / world
        else:
            per_rank = _mean(r.get("images_per_sec_per_rank") for r in train)
        text = f"throughput: {ips:,.0f} images/s total"
        if per_rank is not None:
            text += f", {per_rank:,.0f} images/s per rank"
        lines.append(text)

    per_class = pick("per_class_accuracy", last_eval)
    if isinstance(per_class, list) and per_class:
        names = display_names(summary.get("classes"), len(per_class))
        matrix = last_eval.get("confusion_matrix") if last_eval else None
        counts = [sum(row) for row in matrix] if isinstance(matrix, list) and len(matrix) == len(per_class) else None
        width = max(5, *(len(n) for n in names))
        lines.append("")
        lines.append(f"{'class':<{width}}  accuracy" + ("  images" if counts else ""))
        for i, (name, a) in enumerate(zip(names, per_class)):
            cell = percent(a)
            lines.append(f"{name:<{width}}  {cell}" + (f"  {counts[i]:>6}" if counts else ""))
    lines += _rank_lines(rank_breakdown(train))
    return "\n".join(lines)


def _rank_lines(breakdown: dict[str, list[float]] | None) -> list[str]:
    """The per-rank time table (ms/step), at most 16 ranks: the plot has them all."""
    if not breakdown:
        return []
    heads = [LABELS[p] for p in breakdown]
    lines = ["", "rank  " + "  ".join(heads) + "  (ms/step)"]
    for r in range(min(16, len(next(iter(breakdown.values()))))):
        cells = [f"{breakdown[p][r]:>{len(h)}.1f}" for p, h in zip(breakdown, heads)]
        lines.append(f"{r:>4}  " + "  ".join(cells))
    return lines
