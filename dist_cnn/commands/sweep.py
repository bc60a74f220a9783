"""`dist-cnn sweep SPEC --out DIR`: a hyperparameter search whose every trial is a distributed run
(Optuna; dist_cnn/sweep/). `dist-cnn sweep report DIR`: its results."""

from __future__ import annotations

import argparse
import importlib.util
import warnings
from pathlib import Path

from dist_cnn.config import ArgumentParser
from dist_cnn.errors import UserError
from dist_cnn.sweep import report as report_mod
from dist_cnn.sweep import spec as spec_mod
from dist_cnn.sweep import study as study_mod
from dist_cnn.sweep.driver import Driver
from dist_cnn.sweep.launch_local import LocalLauncher
from dist_cnn.sweep.launch_slurm import SlurmLauncher


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return n


def sweep_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="dist-cnn sweep",
        description="Hyperparameter search (Optuna) where every trial is a dist_cnn run on torchrun or SLURM. "
        "Running the same command again continues the sweep; `dist-cnn sweep report DIR` shows its results.",
    )
    p.add_argument("spec", help="sweep spec: a config file (.toml, .yaml, .json) with a [sweep] table")
    p.add_argument("--out", required=True, help="sweep directory (its study, trials/NNNN/ run directories, results)")
    p.add_argument(
        "--storage",
        default=None,
        help="Optuna RDB storage URL (sqlite:///sweep.db, postgresql://...) instead of the journal file "
        "DIR/journal.log (default: the journal file)",
    )
    p.add_argument("--name", default=None, help="the study's name (default: the name of --out)")
    p.add_argument(
        "--launch",
        choices=("local", "slurm"),
        default="local",
        help="run trials here or as sbatch jobs (default: local)",
    )
    p.add_argument("--procs", type=_positive, default=1, help="--launch local: processes per trial (default: 1)")
    p.add_argument(
        "--parallel",
        type=_positive,
        default=1,
        help="trials at once (local: on disjoint GPUs or CPU cores; slurm: jobs pending or running) (default: 1)",
    )
    p.add_argument(
        "--max-failures",
        type=_positive,
        default=None,
        help="end the sweep once this many trials have failed (default: no limit)",
    )
    p.add_argument(
        "--slurm-script",
        default="slurm/train.sh",
        help="--launch slurm: the batch script each trial is submitted with (default: slurm/train.sh)",
    )
    p.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="--launch slurm: an sbatch option for every trial, e.g. --sbatch=--gpus-per-node=4 (repeatable)",
    )
    return p


def _need_optuna() -> None:
    if importlib.util.find_spec("optuna") is None:
        raise UserError("dist-cnn sweep needs Optuna: pip install 'dist_cnn[sweep]'")


def main_sweep(argv) -> int:
    if argv[:1] == ["report"]:
        return main_report(argv[1:])
    args = sweep_parser().parse_args(argv)
    _need_optuna()
    spec = spec_mod.load(args.spec)
    study_mod.pruner(spec.pruner)  # its arguments are checked before anything starts
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if args.launch == "slurm":
        launcher = SlurmLauncher(args.parallel, args.sbatch, args.slurm_script)
    else:
        launcher = LocalLauncher(args.parallel, args.procs)
    study, record = study_mod.open_sweep(out, spec, args.storage, args.name)
    print(f"sweep {record['name']}: {spec.trials} trials, storage {record['storage']}", flush=True)
    code = Driver(out, spec, study, record, launcher, args.max_failures).run()
    if code in (0, 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's plots are marked experimental
            report_mod.report(out, study, spec.objective)
    return code


def main_report(argv) -> int:
    p = ArgumentParser(
        prog="dist-cnn sweep report",
        description="A sweep's trials sorted by its objective; writes DIR/best.toml and DIR/plots/*.png.",
    )
    p.add_argument("out", metavar="DIR", help="the sweep directory")
    args = p.parse_args(argv)
    _need_optuna()
    study, record = study_mod.load_sweep(Path(args.out))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report_mod.report(Path(args.out), study, record["spec"]["objective"])
    return 0
