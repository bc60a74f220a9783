"""pytest plugin (tests/conftest.py loads it): how tests/run.sh splits the suite between its
pytest-xdist workers.

A work unit is a test module, so that its module fixtures (the training runs its tests share) are
made once; `tests/slurm/` is one unit, because its tests share the one-node SLURM cluster that one
worker starts and stops. The units with the most slow tests go first, so that no long one is left to
run alone at the end.

xdist's own LoadScopeScheduling puts a dead worker's whole unit back in the queue, the test it died
in included, and then never ends the session: one worker killed (by the kernel's OOM killer, say)
turns the run into a hang. Here the test it died in is reported failed once (xdist does that) and
only the unit's tests that had not run go back, first in the queue. A worker that dies between two
tests, before its death is noticed, makes sending it work fail: that unit goes back too. A worker
runs a test only once it knows the next one, so the worker that takes a dead one's place is given
at least two.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys
import traceback
from collections import Counter

import pytest

SLOW_WEIGHT = 30  # a slow test counts as about this many quick ones


@pytest.hookimpl(optionalhook=True)  # pytest without xdist still runs the suite, in one process
def pytest_xdist_make_scheduler(config, log):
    return ModuleScheduling(config, log)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):
    if error:  # xdist reports the test the worker was in as failed; say what the kernel saw
        print(f"\n{why_worker_died()}", file=sys.stderr)


_trace_file = None


def pytest_configure(config):
    global _trace_file
    if hasattr(config, "workerinput"):
        _trace_file = os.fdopen(os.dup(2), "w", buffering=1)  # before pytest captures stderr
        trace_os_exit(_trace_file)


def pytest_runtest_setup(item):
    if _trace_file is not None:  # again for each test: a test's run may have put its own handlers back
        trace_signals(_trace_file)


def trace_signals(err) -> None:
    """A worker ended by a signal whose default is to end the process first writes its Python stacks
    to its own stderr, which the controller passes on."""
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        if signal.getsignal(s) in (signal.SIG_DFL, None):
            faulthandler.register(s, file=err, all_threads=True, chain=True)


def trace_os_exit(err) -> None:
    """A worker that calls os._exit first says where from."""
    worker, real_exit = os.getpid(), os._exit

    def traced_exit(code):
        if os.getpid() == worker:  # not a forked child (DataLoader workers end this way)
            err.write(f"a test worker calls os._exit({code}) from:\n{''.join(traceback.format_stack())}")
        real_exit(code)

    os._exit = traced_exit


def pytest_collection_modifyitems(config, items):
    if not hasattr(config, "workerinput"):
        return  # not an xdist worker: keep the file order
    weight = Counter()
    for item in items:
        weight[item.module.__name__] += SLOW_WEIGHT if item.get_closest_marker("slow") else 1
    items.sort(key=lambda item: -weight[item.module.__name__])  # stable: a module keeps its own order


def why_worker_died() -> str:
    """For a worker that died with no traceback: what the kernel said about killing a process (its
    OOM killer, usually), and the memory left."""
    try:
        kernel = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        kernel = []
    kills = [line for line in kernel if "killed process" in line.lower() or "out of memory" in line.lower()]
    with open("/proc/meminfo") as f:
        available = next((line.split(":")[1].strip() for line in f if line.startswith("MemAvailable")), "?")
    return "\n".join(["a test worker died; memory available now: " + available, *kills[-4:]])


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # no xdist: the suite runs in one process
    LoadScopeScheduling = object


class ModuleScheduling(LoadScopeScheduling):
    def _split_scope(self, nodeid: str) -> str:
        return "tests/slurm" if nodeid.startswith("tests/slurm/") else super()._split_scope(nodeid)

    def remove_node(self, node) -> str | None:
        """Called when a worker finished (nothing pending) or died: returns the test it died in."""
        workload = self.assigned_work.pop(node)
        pending = {scope: [i for i, done in unit.items() if not done] for scope, unit in workload.items()}
        pending = {scope: ids for scope, ids in pending.items() if ids}
        if not pending:
            return None
        crashed = next(iter(pending.values())).pop(0)  # a worker runs its units' tests in order
        self._requeue_first(pending)
        for other in self.assigned_work:
            self._reschedule(other)
        return crashed

    def _requeue_first(self, pending: dict[str, list[str]]) -> None:
        for scope, ids in reversed(pending.items()):
            if ids:
                self.workqueue[scope] = dict.fromkeys(ids, False)
                self.workqueue.move_to_end(scope, last=False)

    def _assign_work_unit(self, node) -> None:
        scope, unit = next(iter(self.workqueue.items()))
        try:
            super()._assign_work_unit(node)
        except OSError:  # the worker is gone; its errordown event, still queued, removes it
            del self.assigned_work[node][scope]
            self._requeue_first({scope: [i for i, done in unit.items() if not done]})
            raise

    def _reschedule(self, node) -> None:
        """Tops the worker up to two pending tests: a worker runs a test only once it knows the next
        one (or is told to stop), so a worker given a one-test unit and nothing else would wait."""
        if node not in self.registered_collections:
            return  # a worker still collecting: it is scheduled once it has collected
        try:
            super()._reschedule(node)
            while self.workqueue and not node.shutting_down and self._pending_of(self.assigned_work[node]) < 2:
                super()._reschedule(node)
        except OSError:  # the worker is gone
            pass
