"""DataLoader workers leave the stop signals to their rank.

Ctrl-C in a terminal, `scancel` and a SLURM time limit signal the whole process group, DataLoader
workers included. A worker killed by SIGTERM (or one that turns SIGINT into KeyboardInterrupt and
quits) makes its rank fail in the middle of a step with no checkpoint. So workers ignore SIGINT,
SIGUSR1 and any SIGTERM but their parent's (the DataLoader terminates workers it shuts down with
SIGTERM), and the rank decides (distributed/preempt.py: checkpoint at the next step, then
exit). The signals are blocked while workers start, so that none arrives in the window between the
fork and the worker's own handlers; they are delivered to the rank when it unblocks them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """A DataLoader worker_init_fn: SIGINT and SIGUSR1 are ignored; SIGTERM is taken by a thread
    that ends the worker only when its parent sent it (the DataLoader shutting its workers down),
    never when it came to the whole group (scancel, a time limit)."""
    for s in (signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # still blocked since the fork
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGUSR1})
    threading.Thread(target=_terminate_from_parent, args=(os.getppid(),), daemon=True).start()


def _terminate_from_parent(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            # the DataLoader (or multiprocessing at exit) ending its worker: a clean exit, which the
            # DataLoader's SIGCHLD check does not count as a worker failure
            os._exit(0)


@contextlib.contextmanager
def stop_signals_blocked():
    """Around the start of workers: they inherit the blocked signals until ignore_stop_signals runs."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def start(loader):
    """iter(loader), its workers (if any) deaf to the stop signals."""
    with stop_signals_blocked():
        return iter(loader)
