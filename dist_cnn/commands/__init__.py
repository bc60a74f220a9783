"""The command line: `dist-cnn [train] [flags]`, `dist-cnn eval`, `dist-cnn report`, `dist-cnn doctor`,
`dist-cnn predict`, `dist-cnn export`, `dist-cnn sweep`, `dist-cnn shard`.

Bad input (UserError) is one line on stderr and exit code 2; a run that cannot go on (non-finite
loss, failed checkpoint write, a lost peer process or node) is one line and exit code 1. Bugs keep
their traceback.
"""

from __future__ import annotations

import os
import sys

from torch.distributed.elastic.multiprocessing.errors import record

from dist_cnn.commands import doctor, export, predict, report, shard, sweep, train
from dist_cnn.commands import eval as eval_command
from dist_cnn.distributed import process_group as distributed
from dist_cnn.errors import PeerError, PeerFailed, TrainingFailed, UserError
from dist_cnn.observability import console, hang

COMMANDS = {
    "train": train.main_train,
    "eval": eval_command.main_eval,
    "report": report.main_report,
    "doctor": doctor.main_doctor,
    "predict": predict.main_predict,
    "export": export.main_export,
    "sweep": sweep.main_sweep,
    "shard": shard.main_shard,
}


def _rank_prefix() -> str:
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID"))
    world = os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))
    # A broken launch environment is reported by the launch checks; the prefix must not fail on it.
    return f"[rank {rank}] " if rank is not None and world.isdigit() and int(world) > 1 else ""


@record
def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    console.configure()  # a training run sets --log-level once it knows its rank (trainer.train)
    try:
        return COMMANDS[command](argv)
    except PeerError:
        return 2  # rank 0 printed it
    except PeerFailed:
        return 1  # rank 0 printed it
    except UserError as e:
        print(f"{_rank_prefix()}error: {e}", file=sys.stderr)
        return 2
    except TrainingFailed as e:
        print(f"{_rank_prefix()}error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{_rank_prefix()}interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        lost = distributed.comm_failure(e)
        if lost is None:
            raise
        hung = hang.on_failure(e)  # rank 0: which rank fell behind, where; every rank: its stacks
        # a peer's failure: its own log has the cause
        print(f"{_rank_prefix()}error: {lost}{f'; {hung}' if hung else ''}", file=sys.stderr)
        return 1


def entry() -> None:
    code = main()
    if distributed.JOINED_GROUP:
        # Everything is written and the group destroyed; skip interpreter teardown, where a gloo
        # thread still joinable in a C++ destructor has aborted ranks ("terminate called without an
        # active exception", SIGABRT) after successful runs.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
