"""dist_cnn against the frameworks a user would pick instead: PyTorch Lightning and Accelerate, same job.

The job: the seed CNN on CIFAR-10 from an image folder, global batch 128, 2 epochs, fp32, SGD with Nesterov
momentum 0.9, peak LR 0.08 (linear warmup over the first 20% of the steps, then linear decay to 0), weight
decay 5e-4 on weights but not on biases, inputs normalized by the training set's mean and std, no
augmentation, cross-entropy loss. The peers are written as their users write them: the images as tensors
in memory, a TensorDataset and a DataLoader (shuffled, last incomplete batch dropped, no workers), the
model and the loop in the framework's own idiom:

  lightning   a LightningModule (training_step, configure_optimizers with a per-step LambdaLR sized by
              trainer.estimated_stepping_batches) and Trainer(accelerator="cpu", devices=N,
              strategy="ddp" for N > 1), started as `python peers.py ...` (Lightning starts the other
              processes itself); DataLoader batch 128/N per process (Lightning adds a DistributedSampler)
  accelerate  Accelerator(split_batches=True) + prepare(model, optimizer, loader, scheduler), a plain
              loop with accelerator.backward; 1 process: `python peers.py ...`, N: `accelerate launch
              --multi_gpu --num_processes N` (torchrun underneath; gloo on the CPU)
  dist_cnn    `train.py --dataset imagefolder --precision fp32` (torchrun for N > 1), and as an extra row
              its default `--precision auto`

With `--precisions fp32,bf16` every program also runs in bf16 autocast (Lightning "bf16-mixed",
Accelerate mixed_precision="bf16", dist_cnn `--precision bf16`), and the table compares each precision
with itself. The "auto" row is compared with the faster peer at fp32, each program's own default.
Round r seeds every program with --seed + r (weights and data order), so the accuracy medians are over
seeds, not one draw shared by every row.

All see identical pixels: the image folder is decoded once with dist_cnn's own loader
(dist_cnn.data.datasets.load_dataset) and saved as a .pt in --cache-dir, which the peers load. Threads: each
program gets the environment a user has (OMP_NUM_THREADS removed unless --threads is given), so each
framework applies its own default (Lightning and dist_cnn: cores / processes; torchrun: 1 per process).

Measured: training images per second (images trained / seconds from the first to the last training step
of the run, without start-up, data loading or evaluation; dist_cnn: summary.json's train_images_per_sec,
the same span) and the test accuracy after the last epoch. Repeats are interleaved (every program once
per round), the table shows medians, and the ratio is dist_cnn's img/s over the faster peer's.

    python benchmarks/peers.py [--data-dir DIR] [--repeats 3] [--procs 1,2] [--epochs 2]
                               [--precisions fp32[,bf16]] [--seed 0] [--json PATH]
Needs the `bench` extra: pip install -e '.[bench]' (pytorch-lightning; accelerate is a dependency).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's benchmarks and dist_cnn

from benchmarks.common import CIFAR_DIR, Stamp, child_env, parser, read_run, train_command  # noqa: E402

GLOBAL_BATCH, PEAK_LR, MOMENTUM, WEIGHT_DECAY, WARMUP = 128, 0.08, 0.9, 5e-4, 0.2
PEERS = ("lightning", "accelerate")


# ------------------------------------------------------------------------------------------ the recipe


def seed_model(num_classes: int, image_size: int) -> torch.nn.Module:
    from dist_cnn.models.registry import build_model  # the same architecture and initialization for everyone

    return build_model("seed", in_channels=3, num_classes=num_classes, image_size=image_size)


def sgd(model: torch.nn.Module) -> torch.optim.SGD:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]  # biases
    return torch.optim.SGD(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=PEAK_LR,
        momentum=MOMENTUM,
        nesterov=True,
    )


def warmup_linear(optimizer, total_steps: int):
    warm = int(WARMUP * total_steps)

    def factor(step):
        return (step + 1) / warm if step < warm else max(0.0, 1 - (step - warm) / max(1, total_steps - warm))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def load_tensors(path: str):
    d = torch.load(path, weights_only=True)
    x = d["train_x"].float().div_(255)
    mean, std = x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3))
    del x
    return d, mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    # uint8 batches normalized on the fly: 4x less memory per process than a float copy of the dataset
    return (x.float().div_(255) - mean) / std


@torch.no_grad()
def test_accuracy(model, d, mean, std) -> float:
    model.eval()
    correct = 0
    for x, y in zip(d["test_x"].split(1000), d["test_y"].split(1000)):
        correct += int((model(normalize(x, mean, std)).argmax(1) == y).sum())
    return correct / len(d["test_y"])


def write_result(path: str, **fields):
    Path(path).write_text(json.dumps(fields))


# ------------------------------------------------------------------------------------------ Lightning


def run_lightning(a):
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    d, mean, std = load_tensors(a.tensors)
    pl.seed_everything(a.seed, verbose=False)

    class SeedModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = seed_model(len(d["classes"]), d["train_x"].shape[-1])

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.model(normalize(x, mean, std)), y)

        def configure_optimizers(self):
            opt = sgd(self.model)
            sched = warmup_linear(opt, self.trainer.estimated_stepping_batches)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    class Clock(pl.Callback):
        def on_train_start(self, trainer, module):
            self.t0 = time.perf_counter()

        def on_train_end(self, trainer, module):
            self.seconds = time.perf_counter() - self.t0

    loader = DataLoader(
        TensorDataset(d["train_x"], d["train_y"]), batch_size=GLOBAL_BATCH // a.procs, shuffle=True, drop_last=True
    )
    clock, module = Clock(), SeedModule()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=a.procs,
        strategy="ddp" if a.procs > 1 else "auto",
        max_epochs=a.epochs,
        precision="bf16-mixed" if a.precision == "bf16" else "32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[clock],
    )
    trainer.fit(module, loader)
    if trainer.global_rank == 0:
        write_result(
            a.result,
            images_per_sec=trainer.global_step * GLOBAL_BATCH / clock.seconds,
            seconds=clock.seconds,
            steps=trainer.global_step,
            threads=torch.get_num_threads(),
            test_accuracy=test_accuracy(module.model, d, mean, std),
        )


# ------------------------------------------------------------------------------------------ Accelerate


def run_accelerate(a):
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from torch.utils.data import DataLoader, TensorDataset

    # split_batches: the loader's batch is the global batch
    accelerator = Accelerator(split_batches=True, mixed_precision="bf16" if a.precision == "bf16" else "no")
    d, mean, std = load_tensors(a.tensors)
    set_seed(a.seed)
    model = seed_model(len(d["classes"]), d["train_x"].shape[-1])
    loader = DataLoader(
        TensorDataset(d["train_x"], d["train_y"]), batch_size=GLOBAL_BATCH, shuffle=True, drop_last=True
    )
    optimizer = sgd(model)
    scheduler = warmup_linear(optimizer, len(loader) * a.epochs)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    accelerator.wait_for_everyone()
    t0, steps = time.perf_counter(), 0
    for _ in range(a.epochs):
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(model(normalize(x, mean, std)), y)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            steps += 1
    accelerator.wait_for_everyone()
    seconds = time.perf_counter() - t0
    if accelerator.is_main_process:
        write_result(
            a.result,
            images_per_sec=steps * GLOBAL_BATCH / seconds,
            seconds=seconds,
            steps=steps,
            threads=torch.get_num_threads(),
            test_accuracy=test_accuracy(accelerator.unwrap_model(model), d, mean, std),
        )
    accelerator.end_training()


# ------------------------------------------------------------------------------------------ driver


def cached_tensors(data_dir: str, cache_dir: Path) -> Path:
    """Decode the image folder with dist_cnn's loader (its own cache makes this fast after the first time)
    and save the tensors for the peers, keyed by what was decoded."""
    from dist_cnn.config import DataConfig
    from dist_cnn.data.datasets import load_dataset

    ds = load_dataset(DataConfig(dataset="imagefolder", data_dir=data_dir))
    key = hashlib.sha1(
        repr(
            (
                os.path.abspath(data_dir),
                tuple(ds.train_x.shape),
                int(ds.train_x.sum()),
                tuple(ds.test_x.shape),
                int(ds.test_x.sum()),
            )
        ).encode()
    ).hexdigest()[:16]
    path = cache_dir / f"peers-{key}.pt"
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(
            {
                "train_x": ds.train_x,
                "train_y": ds.train_y,
                "test_x": ds.test_x,
                "test_y": ds.test_y,
                "classes": ds.classes,
            },
            tmp,
        )
        os.replace(tmp, path)
    return path


def program_env(threads: int | None) -> dict:
    """Each framework picks its own thread count unless --threads is given."""
    env = {k: v for k, v in child_env(PYTHONUNBUFFERED="1").items() if k != "OMP_NUM_THREADS"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_peer(peer: str, precision: str, procs: int, seed: int, tensors: Path, epochs: int, env: dict, work: Path):
    result = work / f"{peer}-{precision}-{procs}-{time.monotonic_ns()}.json"
    args = [
        str(Path(__file__).resolve()),
        "--peer",
        peer,
        "--procs",
        str(procs),
        "--tensors",
        str(tensors),
        "--epochs",
        str(epochs),
        "--precision",
        precision,
        "--seed",
        str(seed),
        "--result",
        str(result),
    ]
    if peer == "accelerate" and procs > 1:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(procs),
            "--num_machines",
            "1",
            "--mixed_precision",
            "bf16" if precision == "bf16" else "no",
            "--dynamo_backend",
            "no",
            *args,
        ]
    else:
        cmd = [sys.executable, *args]
    _run(cmd, env, work / f"{result.stem}.log")
    return json.loads(result.read_text())


def run_dist_cnn(precision: str, procs: int, seed: int, data_dir: str, epochs: int, env: dict, work: Path) -> dict:
    out = work / f"dist_cnn-{precision}-{procs}-{time.monotonic_ns()}"
    args = ["--dataset", "imagefolder", "--data-dir", data_dir, "--batch-size", GLOBAL_BATCH, "--epochs", epochs]
    _run(train_command([*args, "--precision", precision, "--seed", seed], out, procs), env, work / f"{out.name}.log")
    s, _ = read_run(out)
    return {
        "images_per_sec": s["train_images_per_sec"],
        "seconds": s["train_seconds"],
        "steps": s["steps"],
        "test_accuracy": s["test_accuracy"],
        "precision": s["precision"],
    }


class ProgramFailed(Exception):
    pass


def _run(cmd: list[str], env: dict, log: Path):
    with open(log, "w") as f:
        rc = subprocess.run(cmd, check=False, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise ProgramFailed(f"{' '.join(cmd[:4])} ... failed (exit {rc}); last lines of {log}:\n{tail}")


def medians(runs: list[dict]) -> dict | None:
    ok = [x for x in runs if x]
    if not ok:
        return None
    return {k: statistics.median(x[k] for x in ok) for k in ("images_per_sec", "test_accuracy")}


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, "CIFAR-10 as an image folder (train/, test/)", CIFAR_DIR)
    p.add_argument(
        "--cache-dir",
        default=str(Path.home() / ".cache" / "dist_cnn"),
        help="where the decoded tensors handed to the peers are saved",
    )
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--procs", default="1,2", help="process counts to compare, comma-separated")
    p.add_argument("--epochs", type=int, default=2, help="training epochs (the job: 2)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="set OMP_NUM_THREADS for every program (default: each framework's own choice)",
    )
    p.add_argument("--precisions", default="fp32", help="fp32 and/or bf16, comma-separated: each compared with itself")
    p.add_argument("--seed", type=int, default=0, help="round r runs every program with seed + r")
    p.add_argument("--peer", choices=PEERS, help=argparse.SUPPRESS)  # internal: run one peer program
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--tensors", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.peer:
        a.procs = int(a.procs)
        (run_lightning if a.peer == "lightning" else run_accelerate)(a)
        return 0
    stamp = Stamp()

    procs = [int(n) for n in a.procs.split(",")]
    precisions = [x for x in a.precisions.split(",") if x]
    if not precisions or set(precisions) - {"fp32", "bf16"}:
        p.error(f"--precisions: fp32 and/or bf16, got {a.precisions!r}")
    tensors = cached_tensors(a.data_dir, Path(a.cache_dir))
    env = program_env(a.threads)
    work = Path(tempfile.mkdtemp(prefix="peers-"))
    programs = []  # (name, precision it is compared at, run(procs, seed))
    for prec in precisions:
        for peer in PEERS:
            programs.append(
                (
                    f"{peer} {prec}",
                    prec,
                    lambda n, s, peer=peer, prec=prec: run_peer(peer, prec, n, s, tensors, a.epochs, env, work),
                )
            )
        programs.append(
            (
                f"dist_cnn {prec}",
                prec,
                lambda n, s, prec=prec: run_dist_cnn(prec, n, s, a.data_dir, a.epochs, env, work),
            )
        )
    # the default beside the peers' default (fp32), when that is measured
    auto_at = "fp32" if "fp32" in precisions else precisions[0]
    programs.append(
        ("dist_cnn auto", auto_at, lambda n, s: run_dist_cnn("auto", n, s, a.data_dir, a.epochs, env, work))
    )
    runs = {(name, n): [] for name, _, _ in programs for n in procs}

    def save():  # after every run: a cut-off benchmark keeps what it measured
        stamp.write(
            a.json,
            {
                "runs": {f"{k[0]}|{k[1]}": v for k, v in runs.items()},
                "summary": summary,
                "epochs": a.epochs,
                "repeats": a.repeats,
                "seeds": [a.seed + r for r in range(a.repeats)],
            },
        )

    summary: dict = {}
    for r in range(a.repeats):  # interleaved, so load changes on the machine hit every program alike
        for n in procs:
            for name, _, run in programs:
                try:
                    res = run(n, a.seed + r)
                except ProgramFailed as e:  # one broken program must not cost the other figures
                    print(f"round {r + 1}/{a.repeats}  {n} proc  {name}: {e}", flush=True)
                    res = None
                runs[name, n].append(res)
                save()
                if res:
                    print(
                        f"round {r + 1}/{a.repeats}  {n} proc  {name:<16} {res['images_per_sec']:8.0f} img/s  "
                        f"acc {res['test_accuracy']:.4f}",
                        flush=True,
                    )

    print(
        f"\nseed CNN, CIFAR-10 (image folder), global batch {GLOBAL_BATCH}, {a.epochs} epochs, "
        f"medians of {a.repeats} interleaved runs (seeds {a.seed}..{a.seed + a.repeats - 1})"
    )
    print(f"{'procs':>5}  {'program':<16} {'img/s':>8} {'test acc':>9}  {'vs faster peer':>14}")
    for n in procs:
        med = {name: medians(runs[name, n]) for name, _, _ in programs}
        summary[n] = {}
        for prec in precisions:
            peers = [f"{peer} {prec}" for peer in PEERS if med[f"{peer} {prec}"]]
            faster = max(peers, key=lambda peer: med[peer]["images_per_sec"]) if peers else None
            summary[n][f"faster_peer_{prec}"] = faster
            for name, at, _ in programs:
                if at != prec:
                    continue
                if not med[name]:
                    print(f"{n:>5}  {name:<16} {'failed':>8}")
                    continue
                extra = ""
                if faster and name.startswith("dist_cnn"):
                    med[name]["ratio_to_faster_peer"] = med[name]["images_per_sec"] / med[faster]["images_per_sec"]
                    extra = f"{med[name]['ratio_to_faster_peer']:13.2f}x"
                print(
                    f"{n:>5}  {name:<16} {med[name]['images_per_sec']:8.0f} {med[name]['test_accuracy']:9.4f}  {extra}"
                )
            print(f"{'':>5}  faster peer at {prec}: {faster}")
        summary[n].update(med)
    save()
    print(f"\nlogs: {work}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
