"""The tutorial program as published against `train.py`'s default recipe, same run.

Both train the seed architecture (the tutorial's loop with `--net wide`) on the shared CIFAR-10 copy.
Prints images/s, test accuracy, and the training time each needs to reach the tutorial's 2-epoch
accuracy (dist_cnn evaluates after every epoch, so its time is the first epoch end at or above it).

    python benchmarks/core.py --data-dir data/cifar10-jpeg [--tutorial-max-images N] [--json out.json]
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's benchmarks and dist_cnn

from benchmarks import tutorial  # noqa: E402
from benchmarks.common import CIFAR_DIR, Stamp, child_env, parser, read_run, train_command  # noqa: E402


def run_dist_cnn(data_dir: str, extra: list[str]) -> dict:
    out = Path(tempfile.mkdtemp(prefix="core-bench-")) / "run"
    args = ["--dataset", "imagefolder", "--data-dir", data_dir, *extra]
    subprocess.run(train_command(args, out), env=child_env(), check=True, stdout=subprocess.DEVNULL)
    summary, rows = read_run(out)
    summary["history"] = [
        {"epoch": e["epoch"], "train_seconds": e["train_seconds"], "test_accuracy": e["test_accuracy"]}
        for e in rows
        if e["event"] == "eval"
    ]
    return summary


def time_to(history: list[dict], accuracy: float):
    return next((h["train_seconds"] for h in history if h["test_accuracy"] >= accuracy), None)


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, "CIFAR-10 as an image folder (train/, test/)", CIFAR_DIR)
    p.add_argument(
        "--tutorial-max-images",
        type=int,
        default=None,
        help="cut the tutorial's epochs short (img/s only; its accuracy is then not comparable)",
    )
    p.add_argument(
        "--tutorial-json",
        help="reuse a saved `benchmarks/tutorial.py --net wide --json` result "
        "instead of rerunning the tutorial (~3 min quiet, far longer on a busy machine)",
    )
    p.add_argument("train_args", nargs="*", help="extra train.py flags for the dist_cnn run (after --)")
    args = p.parse_args(argv)
    stamp = Stamp()

    if args.tutorial_json:
        tut = json.loads(Path(args.tutorial_json).read_text())
    else:
        tut = tutorial.run(
            args.data_dir, epochs=2, max_images=args.tutorial_max_images, net="wide", seed=0, log=lambda *a: None
        )
    ours = run_dist_cnn(args.data_dir, args.train_args)
    target = tut["test_accuracy"]
    t_ours = time_to(ours["history"], target)
    rows = [
        (
            "tutorial (batch 4, DataLoader+PIL, 2 workers)",
            tut["images_per_second"],
            tut["test_accuracy"],
            tut["train_seconds"],
            tut["train_seconds"],
        ),
        (
            f"dist_cnn default recipe (batch {ours['global_batch_size']}, {ours['precision']})",
            ours["train_images_per_sec"],
            ours["test_accuracy"],
            ours["train_seconds"],
            t_ours,
        ),
    ]
    print(f"\n{'':52} {'img/s':>8} {'test acc':>9} {'train s':>8} {'s to tut acc':>13}")
    for name, ips, acc, secs, t in rows:
        print(f"{name:52} {ips:8.0f} {acc:9.2%} {secs:8.1f} {f'{t:.1f}' if t else 'never':>13}")
    speed = ours["train_images_per_sec"] / tut["images_per_second"]
    print(f"\nthroughput ratio: {speed:.1f}x")
    if t_ours:
        print(
            f"time to the tutorial's {target:.2%}: {tut['train_seconds'] / t_ours:.1f}x faster "
            f"(target >= 15x: {'PASS' if tut['train_seconds'] / t_ours >= 15 else 'FAIL'})"
        )
    at2 = next((h["test_accuracy"] for h in ours["history"] if h["epoch"] == 2), None)
    if at2 is not None:
        print(f"accuracy after 2 epochs: {at2:.2%} (target >= 65%: {'PASS' if at2 >= 0.65 else 'FAIL'})")
    stamp.write(args.json, {"tutorial": tut, "dist_cnn": ours})
    return 0


if __name__ == "__main__":
    sys.exit(main())
