"""Command line: `dist-cnn [train] [flags]`, `dist-cnn eval`, `dist-cnn report`, `dist-cnn doctor`.

Bad input (UserError) is one line on stderr and exit code 2; a run that cannot go on (non-finite
loss, failed checkpoint write) is one line and exit code 1. Bugs keep their traceback.
"""
from __future__ import annotations

import argparse
import os
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from . import config
from .distributed import PeerError
from .errors import UserError

COMMANDS = ("train", "eval", "report", "doctor")


def _rank_prefix() -> str:
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID"))
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")) or 1)
    return f"[rank {rank}] " if world > 1 and rank is not None else ""


def train_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    parser = config.ArgumentParser(
        prog=prog, description="Train a CNN with dist_cnn (one process, torchrun, srun or accelerate launch).",
    )
    config.add_arguments(parser)
    parser.add_argument("--dry-run", action="store_true",
                        help="print what was detected (launcher, rank, world size, device, backend, head "
                             "address, SLURM job, CUDA, threads), check the launch against the allocation "
                             "and exit without training; the same as `dist-cnn doctor` (default: False)")
    return parser


def run_train(argv) -> int:
    ns = train_parser().parse_args(argv) if "--dry-run" not in argv else None
    if ns is None or ns.dry_run:  # (ns.dry_run: an abbreviation) the doctor, which also takes --json
        from .doctor import main_doctor
        return main_doctor(argv, prog="train.py --dry-run")
    from .trainer import train
    cfg = config.from_args(ns)
    summary = train(cfg)
    return 0 if summary else 1


def run_report(argv) -> int:
    p = config.ArgumentParser(prog="dist-cnn report", description="Re-render plots and the report of a run.")
    p.add_argument("run_dir", help="a run directory holding metrics.jsonl")
    from .report import main_report
    return main_report(p.parse_args(argv).run_dir)


def run_eval(argv) -> int:
    from .evalcmd import main_eval
    return main_eval(argv)


def run_doctor(argv) -> int:
    from .doctor import main_doctor
    return main_doctor(argv)


@record
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    run = {"train": run_train, "eval": run_eval, "report": run_report, "doctor": run_doctor}[command]
    try:
        return run(argv)
    except PeerError:
        return 2  # rank 0 printed it
    except UserError as e:
        print(f"{_rank_prefix()}error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{_rank_prefix()}interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from .trainer import TrainingFailed
        if isinstance(e, TrainingFailed):
            print(f"{_rank_prefix()}error: {e}", file=sys.stderr)
            return 1
        raise


def entry() -> None:
    code = main()
    from . import distributed
    if distributed.JOINED_GROUP:
        # Everything is written and the group destroyed; skip interpreter teardown, where a gloo
        # thread still joinable in a C++ destructor has aborted ranks ("terminate called without an
        # active exception", SIGABRT) after successful runs.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
