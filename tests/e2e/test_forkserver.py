"""The tests' fork server (tests/support/forkserver.py) gives what a new interpreter gives."""

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.support import forkserver
from tests.support.common import NOISE, ROOT, SMALL, clean_env, read_events, read_summary, wait_until

PROBE = """
import atexit, json, os, signal, sys
atexit.register(lambda: print("atexit ran", flush=True))
what = sys.argv[1]
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "env": os.environ.get("PROBE_VALUE"),
                  "path0": sys.path[0], "main": __name__}))
print("to stderr", file=sys.stderr)
if what == "raise":
    raise ValueError("boom")
if what == "exit":
    sys.exit(7)
if what == "signal":
    os.kill(os.getpid(), signal.SIGTERM)
if what == "sleep":
    import time
    time.sleep(60)
"""


def both(args, cwd, env, timeout=60):
    """The same `python ARGS` through the fork server and as a new interpreter."""
    forked = forkserver.run(args, cwd=cwd, env=env, timeout=timeout, server_env=clean_env())
    assert forked is not None, "eligible arguments ran as a new interpreter"
    real = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return forked, real


@pytest.mark.parametrize("what", ["ok", "raise", "exit", "signal"])
def test_a_forked_script_ends_as_a_new_interpreter_would(tmp_path, what):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    work = tmp_path / "work"
    work.mkdir()
    forked, real = both([str(script), what], work, clean_env(PROBE_VALUE="x1"))
    assert forked.returncode == real.returncode == {"ok": 0, "raise": 1, "exit": 7, "signal": -signal.SIGTERM}[what]
    assert forked.stdout == real.stdout  # arguments, directory, environment, sys.path[0], __main__, atexit
    assert '"env": "x1"' in forked.stdout and str(work) in forked.stdout
    assert forked.stderr.splitlines()[0] == real.stderr.splitlines()[0] == "to stderr"
    assert ("ValueError: boom" in forked.stderr) == ("ValueError: boom" in real.stderr) == (what == "raise")


def test_a_module_runs_as_with_dash_m(tmp_path):
    (tmp_path / "probe_mod.py").write_text(PROBE)  # importable from the working directory, as with -m
    forked, real = both(["-m", "probe_mod", "ok"], tmp_path, clean_env(PROBE_VALUE="x2"))
    assert forked.returncode == real.returncode == 0
    assert forked.stdout == real.stdout and '"main": "__main__"' in forked.stdout


def test_a_run_past_its_timeout_is_killed(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    with pytest.raises(subprocess.TimeoutExpired):
        forkserver.run([str(script), "sleep"], cwd=tmp_path, env=clean_env(), timeout=3, server_env=clean_env())


def test_start_up_variables_or_other_forms_run_a_new_interpreter():
    base = clean_env()
    assert forkserver.eligible(["train.py"], clean_env(DIST_CNN_ANYTHING="1"), base)
    assert forkserver.eligible(["-m", "dist_cnn", "eval"], base, base)
    assert not forkserver.eligible(["train.py"], clean_env(OMP_NUM_THREADS="3"), {**base, "OMP_NUM_THREADS": "1"})
    assert not forkserver.eligible(["train.py"], clean_env(PYTHONHASHSEED="1"), base)
    assert not forkserver.eligible(["-c", "print(1)"], base, base)


@pytest.mark.slow
def test_training_forked_equals_training_in_a_new_interpreter(tmp_path):
    args = [str(ROOT / "train.py"), *SMALL, "--seed", "3"]
    forked = forkserver.run(
        [*args, "--out", str(tmp_path / "f")], cwd=ROOT, env=clean_env(), timeout=300, server_env=clean_env()
    )
    real = subprocess.run(
        [sys.executable, *args, "--out", str(tmp_path / "r")],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert forked.returncode == real.returncode == 0, forked.stderr[-2000:]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in NOISE} for r in rows]  # noqa: E731
    assert strip(read_events(tmp_path / "f")) == strip(read_events(tmp_path / "r"))
    assert read_summary(tmp_path / "f")["test_accuracy"] == read_summary(tmp_path / "r")["test_accuracy"]


def test_the_server_ends_with_its_worker_however_the_worker_ends(tmp_path):
    worker = f"""
import os, signal, sys
sys.path.insert(0, {str(ROOT)!r})
from tests.support import forkserver
from tests.support.common import clean_env
p = forkserver.run([{str(tmp_path / "probe.py")!r}, "ok"], cwd={str(tmp_path)!r}, env=clean_env(), timeout=120,
                   server_env=clean_env())
print(forkserver._server[0].pid, p.returncode, flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no atexit, no cleanup
"""
    (tmp_path / "probe.py").write_text(PROBE)
    p = subprocess.run([sys.executable, "-c", worker], capture_output=True, text=True, timeout=120, env=clean_env())
    server, code = map(int, p.stdout.split())
    assert p.returncode == -signal.SIGKILL and code == 0, p.stderr
    wait_until(
        lambda: not os.path.exists(f"/proc/{server}") or "Z" in open(f"/proc/{server}/stat").read().split()[2],
        timeout=30,
        what="the fork server's exit",
    )


RANK_PROBE = """
import json, os, sys
preloaded = "torch" in sys.modules  # a forked rank starts with torch imported; nothing else may differ
import torch
rank = int(os.environ["RANK"])
print(json.dumps({"rank": rank, "argv": sys.argv, "threads": torch.get_num_threads(), "main": __name__,
                  "own_session": os.getsid(0) == os.getpid(), "world": os.environ["WORLD_SIZE"],
                  "preloaded": preloaded}), flush=True)
sys.exit(int(sys.argv[1]) if rank == 1 else 0)
"""


@pytest.mark.parametrize("rank1_exit", [0, 3])
def test_torchrun_ranks_fork_from_the_agent_and_end_as_new_interpreters_would(tmp_path, rank1_exit):
    script = tmp_path / "rank_probe.py"
    script.write_text(RANK_PROBE)
    args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(rank1_exit)]
    forked, real = both(args, tmp_path, clean_env(), timeout=120)
    assert forked.returncode == real.returncode == (1 if rank1_exit else 0), (forked.stderr[-2000:], real.stderr)
    ranks = {}
    for name, p in (("forked", forked), ("real", real)):
        rows = sorted((json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")), key=str)
        ranks[name] = rows
        assert [r["rank"] for r in rows] == [0, 1], p.stdout
    assert all(r.pop("preloaded") for r in ranks["forked"]), "torchrun's ranks were new interpreters"
    assert not any(r.pop("preloaded") for r in ranks["real"])
    assert ranks["forked"] == ranks["real"]  # argv, OMP_NUM_THREADS applied, __main__, its own session
    assert ranks["forked"][0]["threads"] == 1 and ranks["forked"][0]["own_session"]
    if rank1_exit:
        assert "exitcode  : 3" in forked.stderr and "exitcode  : 3" in real.stderr, forked.stderr[-3000:]
