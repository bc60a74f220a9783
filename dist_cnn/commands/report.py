"""`dist-cnn report RUN_DIR`: re-render the plots and print the report of a run directory."""

from __future__ import annotations

from dist_cnn import config
from dist_cnn.errors import UserError
from dist_cnn.observability.report import check_run_dir, format_report, read_json, read_jsonl, write_plots


def main_report(argv) -> int:
    p = config.ArgumentParser(prog="dist-cnn report", description="Re-render plots and the report of a run.")
    p.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    run_dir = check_run_dir(p.parse_args(argv).run_dir)
    metrics_path, summary_path = run_dir / "metrics.jsonl", run_dir / "summary.json"
    if not metrics_path.is_file() and not summary_path.is_file():
        raise UserError(f"not a dist_cnn run directory (no metrics.jsonl or summary.json): {run_dir}")
    metrics, bad = read_jsonl(metrics_path)
    summary = read_json(summary_path)
    plots = write_plots(run_dir)
    print(f"run: {run_dir}")
    print(format_report(summary, metrics, read_json(run_dir / "config.json")))
    if bad:
        print(f"\n(skipped {bad} unreadable line{'s' if bad != 1 else ''} in {metrics_path.name})")
    if plots:
        print("\nplots: " + ", ".join(str(p) for p in plots))
    return 0
