"""The benchmarks' shared conventions: every script under benchmarks/ imports, has main(argv) -> int and
answers --help with --json and --data-dir; the result stamp names the commit (from git itself), whether
the checkout had uncommitted changes, and the machine."""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
import torch

from benchmarks import common

SHARED = {"__init__", "common", "images"}  # modules the scripts import, not benchmarks themselves
SCRIPTS = sorted(p.stem for p in (common.ROOT / "benchmarks").glob("*.py") if p.stem not in SHARED)


def test_the_benchmarks_are_found():
    assert {"core", "data_pipeline", "scaling", "throughput", "tutorial"} <= set(SCRIPTS)
    assert not (common.ROOT / "benchmarks" / "gpu_check.sh").exists()  # a runner: tools/gpu_check.sh


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_benchmark_has_main_and_the_shared_flags(name, capsys):
    mod = importlib.import_module(f"benchmarks.{name}")
    assert list(inspect.signature(mod.main).parameters) == ["argv"]
    with pytest.raises(SystemExit) as stop:
        mod.main(["--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "--json PATH" in out and "--data-dir" in out
    assert "sys.exit(main())" in (common.ROOT / "benchmarks" / f"{name}.py").read_text()


def test_an_earlier_name_of_data_dir_is_still_accepted_but_not_shown(capsys):
    p = common.parser("doc", "the data", "default-dir", data_aliases=("--cifar-dir",))
    assert p.parse_args([]).data_dir == "default-dir"
    assert p.parse_args(["--cifar-dir", "old"]).data_dir == "old"
    assert p.parse_args(["--data-dir", "new"]).data_dir == "new"
    assert "--cifar-dir" not in p.format_help()


def test_data_pipeline_with_nothing_to_measure_writes_only_the_stamp(tmp_path):
    from benchmarks import data_pipeline

    out = tmp_path / "res.json"
    assert data_pipeline.main(["--cifar-dir", str(tmp_path), "--only", "none", "--json", str(out)]) == 0
    assert list(json.loads(out.read_text())) == ["stamp"]


def git(root: Path, *args: str) -> str:
    cmd = ["git", "-C", str(root), "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()


def test_the_stamp_names_the_commit_and_whether_the_checkout_was_changed(tmp_path):
    git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    git(tmp_path, "add", "a.py")
    git(tmp_path, "commit", "-q", "-m", "one")
    clean = common.Stamp(tmp_path).close()
    assert clean["commit"] == git(tmp_path, "rev-parse", "--short", "HEAD") and clean["dirty"] is False
    (tmp_path / "a.py").write_text("x = 2\n")
    assert common.Stamp(tmp_path).close()["dirty"] is True
    assert common.Stamp(tmp_path / "not-a-repo").close()["commit"] is None


def test_the_stamp_names_the_machine_and_comes_first_in_a_result(tmp_path):
    stamp = common.Stamp()
    out = stamp.write(tmp_path / "sub" / "r.json", {"images_per_sec": 1.0})
    written = json.loads((tmp_path / "sub" / "r.json").read_text())
    assert written == out and list(written) == ["stamp", "images_per_sec"]
    s = written["stamp"]
    assert set(s) == {"commit", "dirty", "torch", "cpu", "cpu_capability", "cores", "load_start", "load_end", "date"}
    assert s["commit"] == git(common.ROOT, "rev-parse", "--short", "HEAD")
    assert s["torch"] == torch.__version__ and s["cpu"] and s["cores"] >= 1
    assert s["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert len(s["load_start"]) == len(s["load_end"]) == 3
    assert datetime.strptime(s["date"], "%Y-%m-%dT%H:%M:%SZ")


def test_train_command_starts_this_checkouts_train_py_under_torchrun_for_several_processes(tmp_path):
    one = common.train_command(["--epochs", 1], tmp_path, 1)
    two = common.train_command(["--epochs", 1], tmp_path, 2)
    assert one[1] == str(common.ROOT / "train.py") and one[-2:] == ["--epochs", "1"]
    assert two[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert "--out" in one and str(tmp_path) in one


def test_trainer_vs_plain_times_both_programs_in_paired_blocks(tmp_path):
    from benchmarks import trainer_vs_plain

    out = tmp_path / "r.json"
    assert trainer_vs_plain.main(["--worlds", "1", "--block", "2", "--rounds", "2", "--json", str(out)]) == 0
    r = json.loads(out.read_text())["world_1"]
    assert set(r["ms_per_step"]) == {"dist_cnn", "plain"} and all(v > 0 for v in r["ms_per_step"].values())
    assert len(r["rounds"]) == 2 and r["ratio"] == pytest.approx(
        sorted(r["rounds"])[0] / 2 + sorted(r["rounds"])[1] / 2
    )


def test_the_report_writes_the_stamped_result_and_ends_with_the_load_average(tmp_path, capsys):
    out = common.Stamp().report(tmp_path / "r.json", {"ratio": 1.0})
    assert json.loads((tmp_path / "r.json").read_text()) == out
    line = capsys.readouterr().out.strip()
    assert line.startswith("load average (1 min): ") and line.endswith(" at the end")
    assert f"{out['stamp']['load_end'][0]:.2f} at the end" in line


@pytest.mark.parametrize(
    "bad", [["--worlds", "x"], ["--worlds", "0,2"], ["--rounds", "1"], ["--block", "abc"], ["--model", "nosuchnet"]]
)
def test_trainer_vs_plain_refuses_bad_input_before_any_work(bad, capsys):
    from benchmarks import trainer_vs_plain

    with pytest.raises(SystemExit) as stop:
        trainer_vs_plain.main(bad)
    assert stop.value.code == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert f": error: argument {bad[0]}: " in err and f"'{bad[1]}'" in err
