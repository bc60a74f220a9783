"""tests/run.sh's two workers: a worker killed in a test fails that one test, the rest of its module
runs on the worker that replaces it, and the session ends (xdist's own module scheduling hangs)."""

import subprocess
import sys

import pytest

from tests.support.common import ROOT

CONFTEST = 'pytest_plugins = ["tests.support.xdist_scheduling"]\n'

MODULE = """
import os, signal, time

def test_1(): time.sleep(0.3)
def test_2():
    if {die}:
        {how}
def test_3(): time.sleep(0.3)
"""


HOW = {
    "SIGKILL": "os.kill(os.getpid(), signal.SIGKILL)",
    "SIGTERM": "os.kill(os.getpid(), signal.SIGTERM); time.sleep(10)",
    "os._exit": "os._exit(3)",
}


def run_toy(tmp_path, victims: str, how: str = "SIGKILL") -> str:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    for name in "abcd":
        (tmp_path / f"test_{name}.py").write_text(MODULE.format(die=name in victims, how=HOW[how]))
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "2", "--no-loadscope-reorder"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=180,
    )
    out = p.stdout + p.stderr
    assert p.returncode == 1, out
    return out


@pytest.mark.parametrize("victim,how", [("a", "SIGKILL"), ("c", "SIGTERM"), ("b", "os._exit")])
def test_a_worker_killed_in_a_test_fails_that_test_and_the_session_ends(tmp_path, victim, how):
    out = run_toy(tmp_path, victim, how)
    assert "1 failed, 11 passed" in out, out
    assert f"crashed while running 'test_{victim}.py::test_2'" in out, out
    assert "a test worker died; memory available now:" in out, out
    if how == "SIGTERM":  # the worker's stack, from the signal
        assert f'test_{victim}.py", line 7 in test_2' in out, out
    if how == "os._exit":
        assert "a test worker calls os._exit(3) from:" in out and f"test_{victim}.py" in out, out


def test_both_first_workers_killed(tmp_path):
    out = run_toy(tmp_path, "ab")
    assert "2 failed, 10 passed" in out, out
    assert "INTERNALERROR" not in out, out
