"""tools/gpu_check.py's verdict: a pytest cut off by the time limit fails the check, whatever its
partial JUnit file says; a part not run yet (two-call mode) is named, not failed."""

from __future__ import annotations

import pytest

from tools import gpu_check

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" tests="2">
<testcase classname="tests.e2e.test_cuda" name="test_bf16_run" time="12.5"/>
<testcase classname="tests.e2e.test_cuda" name="test_compile_run" time="80.0"><skipped message="x"/></testcase>
</testsuite></testsuites>"""


def verdict(tmp_path, *args) -> int:
    (tmp_path / "cuda_tests.xml").write_text(JUNIT)
    return gpu_check.main(["--junit", str(tmp_path / "cuda_tests.xml"), *args])


@pytest.mark.parametrize("rc", ["2", "124", "137"])
def test_a_cut_off_pytest_fails_the_check_though_its_junit_lists_no_failure(tmp_path, capsys, rc):
    assert verdict(tmp_path, "--tests-rc", rc, "--recipe-rc", "0") == 1
    out = capsys.readouterr().out
    assert "CUT OFF" in out and "gpu_check: PROBLEMS" in out


def test_a_complete_passing_run_is_ok_and_other_failures_are_not(tmp_path, capsys):
    assert verdict(tmp_path, "--tests-rc", "0", "--recipe-rc", "0") == 0
    assert verdict(tmp_path, "--tests-rc", "5", "--recipe-rc", "0") == 1  # no test collected
    assert verdict(tmp_path, "--tests-rc", "0", "--recipe-rc", "124") == 1
    assert "CUT OFF" not in capsys.readouterr().out


def test_two_calls_each_part_alone_is_judged_on_what_ran(tmp_path, capsys):
    assert verdict(tmp_path, "--tests-rc", "0", "--recipe-rc", "not-run") == 0
    assert "not run yet: train" in capsys.readouterr().out
    assert verdict(tmp_path, "--tests-rc", "not-run", "--recipe-rc", "0") == 0
    assert verdict(tmp_path, "--tests-rc", "not-run", "--recipe-rc", "not-run") == 1
