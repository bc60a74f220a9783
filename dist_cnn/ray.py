"""Ray Train: dist_cnn's trainer in every worker of a `TorchTrainer`.

    from dist_cnn import ray as dist_cnn_ray
    result = dist_cnn_ray.train(["--dataset", "cifar10", "--epochs", "10"], num_workers=4, use_gpu=True,
                                storage_path="/shared/ray_results", max_failures=3)

Ray starts the workers and makes the process group; the trainer runs inside it (process_group.py,
an existing group), so the batches and weights are those of torchrun with as many processes. Every
metrics record and every checkpoint goes to `ray.train.report` (Ray keeps rank 0's metrics; the
checkpoint is rank 0's step file, reported as a Ray `Checkpoint`). When a worker dies, Ray's
`FailureConfig` restarts the group and the run resumes from the newest reported checkpoint
(`ray.train.get_checkpoint()`), as a torchrun restart resumes from the newest in the run directory;
the run directory and the W&B run (its id is in the checkpoint) stay the same.

Needs the `ray` extra: pip install 'dist_cnn[ray]'.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from dist_cnn import api
from dist_cnn import config as config_mod
from dist_cnn.errors import UserError
from dist_cnn.observability.reporter import Reporter
from dist_cnn.train.rundir import default_run_name
from dist_cnn.train.trainer import train as run_training

NO_RAY = "Ray Train is not installed: pip install 'dist_cnn[ray]'"


def _ray():
    try:
        import ray.train
        import ray.train.torch
    except ImportError:
        raise UserError(NO_RAY) from None
    return ray


JOB_MARK = ".dist_cnn_ray_job"  # in the run directory: which train() call wrote its checkpoints


class RayReporter(Reporter):
    """Metrics and checkpoints to ray.train.report; every rank reports at the same points. Rank 0
    marks the run directory with the job's token before its first checkpoint."""

    def __init__(self, token: str = ""):
        self.token = token

    def run_dir_ready(self, run_dir: Path, is_rank0: bool) -> None:
        if is_rank0 and self.token:
            (run_dir / JOB_MARK).write_text(self.token)

    def metrics(self, record: dict) -> None:
        _ray().train.report(record)

    def checkpoint(self, path: Path | None, record: dict) -> None:
        ray = _ray()
        if path is None:
            ray.train.report(record)
            return
        # A directory of the step file alone, uploaded by Ray to its storage: in the run directory, so
        # that a hard link (no copy) is possible there.
        with tempfile.TemporaryDirectory(dir=path.parent.parent, prefix=".tmp-ray-") as d:
            try:
                os.link(path, Path(d) / path.name)
            except OSError:
                shutil.copy2(path, Path(d) / path.name)
            ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(d))


def job_config(options) -> dict:
    """train()'s options, checked on the driver before Ray starts anything: a list of train.py flags,
    or a dict of fit()'s arguments (model=, train=, test=, classes= and its options). What every
    worker gets: the config, the model factory (fit()'s model object) and fit()'s Datasets."""
    job = {"factory": None, "datasets": None, "token": uuid.uuid4().hex}
    if isinstance(options, (list, tuple)):
        try:
            job["cfg"] = config_mod.from_args(config_mod.train_parser().parse_args([str(a) for a in options]))
        except SystemExit as e:  # --help: printed, and nothing to run
            raise UserError("train.py flags: --help printed the options; nothing was run") from e
    elif isinstance(options, dict):
        options = dict(options)
        model, data = options.pop("model", "seed"), options.pop("train", "cifar10")
        test, classes = options.pop("test", None), options.pop("classes", None)
        job["cfg"], job["factory"] = api.configure(model, data, test, options)
        if not isinstance(data, str):
            job["datasets"] = data, test, classes  # read in each worker, as fit() reads them in each process
    else:
        raise UserError(f"options must be a list of train.py flags or a dict of fit() options, got {type(options)}")
    # Every restart must find the same run directory, and Ray's workers may run in another directory.
    cfg = job["cfg"]
    cfg.log.out = os.path.abspath(cfg.log.out or os.path.join("runs", default_run_name(cfg)))
    return job


def _newest_file(d: str) -> str:
    files = sorted(Path(d).glob("step-*.pt"))
    if not files:
        raise UserError(f"Ray checkpoint {d} holds no step-*.pt file")
    return str(files[-1])


def restarted(run_dir: str, token: str) -> bool:
    """Whether an earlier attempt of this same train() call used the run directory (Ray restarts
    the workers with no count of its own): then its checkpoints are this run's."""
    try:
        return (Path(run_dir) / JOB_MARK).read_text() == token
    except OSError:
        return False


def worker(job: dict) -> dict:
    """Every Ray Train worker: resume from Ray's newest checkpoint if there is one, then train."""
    ray = _ray()
    cfg = copy.deepcopy(job["cfg"])
    data = api.datasets_from(*job["datasets"]) if job["datasets"] else None
    found = ray.train.get_checkpoint()
    rank0 = ray.train.get_context().get_world_rank() == 0
    # Rank 0 reads the checkpoint and hands its state to the others (rundir.resolve_resume).
    with found.as_directory() if found is not None and rank0 else contextlib.nullcontext() as d:
        if d is not None:
            cfg.ckpt.resume = _newest_file(d)
        elif rank0 and cfg.ckpt.resume == "none" and restarted(cfg.log.out, job["token"]):
            # killed after writing a checkpoint but before Ray took it: as a torchrun restart does
            cfg.ckpt.resume = "auto"
        return run_training(cfg, data=data, model_factory=job["factory"], reporter=RayReporter(job["token"]))


def train(
    options,
    num_workers: int = 2,
    use_gpu: bool = False,
    storage_path: str | None = None,
    max_failures: int = 0,
    name: str | None = None,
):
    """Train with Ray Train on `num_workers` workers (one GPU each with use_gpu); returns Ray's Result
    (result.metrics: the run's summary; result.checkpoint: its last checkpoint). `options`: a list of
    train.py flags or a dict of fit()'s arguments. `storage_path`: where Ray keeps the checkpoints
    (shared by all nodes; default ~/ray_results); `max_failures`: restarts after a worker dies
    (-1: without limit); `name`: the Ray run's name (default: the run directory's)."""
    ray = _ray()
    job = job_config(options)
    cfg = job["cfg"]
    trainer = ray.train.torch.TorchTrainer(
        worker,
        train_loop_config=job,
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(
            name=name or os.path.basename(cfg.log.out),
            storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.ckpt.keep or None),
        ),
    )
    return trainer.fit()
