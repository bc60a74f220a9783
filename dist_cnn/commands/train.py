"""`dist-cnn train [flags]` (also `python train.py [flags]`): one training run; --dry-run is the doctor."""

from __future__ import annotations

from dist_cnn import config
from dist_cnn.commands.doctor import main_doctor
from dist_cnn.train.trainer import train


def main_train(argv) -> int:
    ns = None if "--dry-run" in argv else config.train_parser().parse_args(argv)
    if ns is None or ns.dry_run:  # (ns.dry_run: an abbreviation) the doctor, which also takes --json
        return main_doctor(argv, prog="train.py --dry-run")
    result = train(config.from_args(ns))  # a run that cannot go on raises (TrainingFailed, UserError)
    return result.get("exit_code", 0)  # a stopped, unfinished run is not a success (128 + signal)
