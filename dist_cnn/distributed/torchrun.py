"""`python -m dist_cnn.distributed.torchrun [torchrun options] train.py [train options]`: torchrun, made quiet.

The launch scripts (launch/node.sh, launch/multinode.sh, slurm/train.sh) start torchrun through this:
- the training flags are validated once, before any worker starts: a bad flag is the one-line error
  of a plain `python train.py`, not that line N times plus torchrun's ChildFailedError report;
- when a worker fails, the workers' own messages stand (a one-line error, exit code 2, needs nothing
  more) and torchrun's report becomes one line naming the first failed rank and its exit code or
  signal (`DIST_CNN_TORCHRUN_VERBOSE=1` keeps torchrun's full report and logs).
`python -m dist_cnn.distributed.torchrun --check-only [train.py] [train options]` only validates (exit 0 or 2).
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from dist_cnn import config
from dist_cnn.errors import UserError


def check_train_args(args: list[str]) -> int | None:
    """None when the flags are fine; otherwise the exit code (0 after --help, 2 after an error line)."""
    if "--dry-run" in args:  # the doctor runs in every worker and takes its own flags (--json)
        return None
    try:
        config.from_args(config.train_parser().parse_args(args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help printed
        return int(e.code or 0) if isinstance(e.code, int) else 0
    return None


def _ours(script: str) -> bool:
    return os.path.basename(script) == "train.py"  # another entry script has flags of its own


def _exit_code(failure) -> int:
    code = failure.exitcode
    return 128 + (-code) if code < 0 else code


def _describe(rank: int, failure) -> str:
    if failure.exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-failure.exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-failure.exitcode}"
    else:
        how = f"exited with code {failure.exitcode}"
    return f"torchrun: rank {rank} (pid {failure.pid}) {how}; the job stopped (messages above)"


def _killed_by_torchrun(failure, first: float) -> bool:
    """Once a rank fails, torchrun stops the others (SIGTERM, then SIGKILL after its grace period) and
    lists them too, later than the first failure: they are the consequence, not the cause."""
    return failure.exitcode in (-signal.SIGTERM, -signal.SIGKILL) and failure.timestamp > first


def root_cause(failures: dict):
    """(rank, failure) that most likely caused the others: a rank killed by a signal (its peers then
    only lose contact and exit 1, often in the same poll of the agent), else the earliest; never a
    rank that torchrun itself killed while stopping the job."""
    # torchrun stops the others with SIGTERM: beside a rank that failed otherwise, those are never the cause,
    # whatever the order the agent's poll saw them in
    others = {r: f for r, f in failures.items() if f.exitcode != -signal.SIGTERM}
    pool = others or failures
    first = min(f.timestamp for f in pool.values())
    causes = {r: f for r, f in pool.items() if not _killed_by_torchrun(f, first)} or pool
    return min(causes.items(), key=lambda kv: (kv[1].exitcode >= 0, kv[1].timestamp, kv[0]))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--check-only"]:
        rest = argv[1:]
        if rest and rest[0].endswith(".py"):
            if not _ours(rest[0]):
                return 0
            rest = rest[1:]
        code = check_train_args(rest)
        return 0 if code is None else code
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    code = check_train_args(list(args.training_script_args)) if _ours(args.training_script) else None
    if code is not None:
        return code
    verbose = os.environ.get("DIST_CNN_TORCHRUN_VERBOSE", "") not in ("", "0")
    if not verbose:
        # torchrun logs every worker failure at ERROR and re-raises it as a report; the one-line
        # summary below replaces both.
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        run(args)
    except SignalException as e:  # scancel, Ctrl-C: the ranks got it too and checkpoint (preempt.py)
        if verbose:
            raise
        name = signal.Signals(e.sigval).name
        print(f"torchrun: stopped by {name}; the ranks checkpoint and stop (messages above)", file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        if verbose:
            raise
        rank, failure = root_cause(e.failures)
        code = _exit_code(failure)
        if code != 2:  # 2: a worker's own one-line error already said everything
            print(_describe(rank, failure), file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
