"""The table at the end of tools/gpu_check.sh: each CUDA test's result and time (from pytest's JUnit
XML), then the fast recipe's accuracy, train_seconds and images/s (from its summary.json). Standard library
only. Exit status: 0 when pytest exited 0 (every test passed or skipped) and the recipe ran (or had no data),
1 otherwise: a pytest cut off by its time limit (exit 2 after SIGINT, or timeout's 124/137) wrote a JUnit
file of only the tests it ran, which may all have passed; that is a failed check, not a pass."""

import argparse
import json
import os
import xml.etree.ElementTree as ET


def read_junit(path):
    """[(test name, result, seconds, message)] from a pytest --junitxml file."""
    if not os.path.isfile(path):
        return []
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "?")
        if case.get("classname"):
            name = f"{case.get('classname').rsplit('.', 1)[-1]}::{name}"
        result, msg = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                result = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                msg = (
                    (el.get("message") or el.text or "").strip().splitlines()[0][:90]
                    if (el.get("message") or el.text)
                    else ""
                )
                break
        rows.append((name, result, float(case.get("time", 0.0)), msg))
    return rows


CUT_OFF = ("2", "124", "130", "137")  # pytest interrupted (SIGINT at the limit), timeout's own, SIGINT, SIGKILL


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--junit", required=True)
    ap.add_argument("--tests-rc", default="0", help="pytest's exit status, or not-run")
    ap.add_argument("--tests-seconds", type=float, default=0.0)
    ap.add_argument("--unpack-seconds", type=float, default=0.0)
    ap.add_argument("--data-ok", type=int, default=0)
    ap.add_argument("--recipe-rc", default="skipped", help="train.py's exit status, skipped or not-run")
    ap.add_argument("--recipe-ms", type=float, default=0.0)
    ap.add_argument("--summary", default="")
    ap.add_argument("--json", default="")
    ap.add_argument("--total-seconds", type=float, default=0.0)
    ap.add_argument("--airbench", default="", help="airbench_reference.py's JSON")
    ap.add_argument("--airbench-rc", default="skipped")
    a = ap.parse_args(argv)

    tests = read_junit(a.junit)
    summary = {}
    if a.summary and os.path.isfile(a.summary):
        with open(a.summary) as f:
            summary = json.load(f)

    w = max([len(t[0]) for t in tests] + [40])
    lines = [f"{'test':{w}s}  {'result':8s} {'seconds':>8s}", "-" * (w + 19)]
    for name, result, secs, msg in tests:
        lines.append(f"{name:{w}s}  {result:8s} {secs:8.1f}" + (f"   {msg}" if msg and result != "passed" else ""))
    if not tests:
        lines.append(
            f"{'(no JUnit results: pytest exit ' + str(a.tests_rc) + ')':{w}s}  {'ERROR':8s} {a.tests_seconds:8.1f}"
        )
    pytest_row = "pytest -m cuda tests/unit tests/e2e (all)"
    lines.append(f"{pytest_row:{w}s}  {'exit ' + str(a.tests_rc):8s} {a.tests_seconds:8.1f}")
    lines.append(f"{'unpack CIFAR-10 JPEG':{w}s}  {'ok' if a.data_ok else 'NO DATA':8s} {a.unpack_seconds:8.1f}")
    recipe_result = a.recipe_rc if a.recipe_rc in ("skipped", "not-run") else "ok" if a.recipe_rc == "0" else ""
    recipe_result = recipe_result or f"exit {a.recipe_rc}"
    lines.append(f"{'train.py --config configs/fast94.toml':{w}s}  {recipe_result:8s} {a.recipe_ms / 1000:8.1f}")
    lines.append("")
    if summary:
        lines.append(
            f"fast recipe: test accuracy {summary.get('test_accuracy', float('nan')):.4f} "
            f"({summary.get('test_correct')}/{summary.get('test_total')}), "
            f"train_seconds {summary.get('train_seconds', float('nan')):.2f}, "
            f"{summary.get('train_images_per_sec', float('nan')):.0f} images/s, "
            f"{summary.get('epochs')} epochs / {summary.get('steps')} steps, precision "
            f"{summary.get('precision')}, loader {summary.get('loader')}, {summary.get('device')}; "
            f"wall {a.recipe_ms / 1000:.1f} s incl. start-up, decode cache and eval"
        )
    else:
        lines.append(
            "fast recipe: no summary.json (" + ("no data" if not a.data_ok else f"train.py exit {a.recipe_rc}") + ")"
        )
    airbench = {}
    if a.airbench and os.path.isfile(a.airbench):
        with open(a.airbench) as f:
            airbench = json.load(f)
    if airbench:
        lines.append(
            f"airbench 0.1.8 (its own code, same data): test accuracy {airbench['test_acc']:.4f} "
            f"(no TTA {airbench['test_acc_no_tta']:.4f}), train_seconds {airbench['train_seconds']}, "
            f"{airbench['device']}"
        )
    else:
        lines.append(f"airbench reference: {a.airbench_rc}")
    failed = [t for t in tests if t[1] in ("FAILED", "ERROR")]
    cut_off = a.tests_rc in CUT_OFF
    if cut_off:
        lines.append(
            f"pytest was CUT OFF at its time limit (exit {a.tests_rc}): the tests after the last one listed never "
            "ran; rerun the tests part alone (gpu_check.sh tests) for a longer limit"
        )
    # a part not run yet (gpu_check.sh tests / train in two calls) is named, not failed
    not_run = [name for name, rc in (("tests", a.tests_rc), ("train", a.recipe_rc)) if rc == "not-run"]
    tests_ok = a.tests_rc == "not-run" or (a.tests_rc == "0" and not failed)
    ok = tests_ok and a.recipe_rc in ("0", "skipped", "not-run") and len(not_run) < 2
    lines.append(
        f"gpu_check: {'OK' if ok else 'PROBLEMS'} - {sum(t[1] == 'passed' for t in tests)} passed, "
        f"{len(failed)} failed, {sum(t[1] == 'skipped' for t in tests)} skipped; {a.total_seconds:.0f} s in all"
        + (f"; not run yet: {', '.join(not_run)} (gpu_check.sh {' / '.join(not_run)})" if not_run else "")
    )
    print("\n".join(lines))

    if a.json:
        with open(a.json, "w") as f:
            json.dump(
                {
                    "tests": [dict(name=n, result=r, seconds=s, message=m) for n, r, s, m in tests],
                    "pytest_exit": a.tests_rc,
                    "tests_seconds": a.tests_seconds,
                    "data_ok": bool(a.data_ok),
                    "recipe_exit": a.recipe_rc,
                    "recipe_wall_seconds": a.recipe_ms / 1000,
                    "recipe_summary": {
                        k: summary.get(k)
                        for k in (
                            "test_accuracy",
                            "train_seconds",
                            "train_images_per_sec",
                            "epochs",
                            "steps",
                            "precision",
                            "loader",
                            "device",
                            "global_batch_size",
                        )
                    }
                    if summary
                    else None,
                    "airbench": airbench or None,
                    "ok": ok,
                    "total_seconds": a.total_seconds,
                },
                f,
                indent=2,
            )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
