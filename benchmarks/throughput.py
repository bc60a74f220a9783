"""Training throughput (images/s of forward + backward + SGD step) through each input path, and how
close it gets to this machine's matrix-product ceiling.

Paths (rows of the table):
  (a) tutorial  the PyTorch tutorial's pipeline: ImageFolder + PIL + ToTensor + Normalize, DataLoader
                with 2 workers, the seed architecture (benchmarks/tutorial.py's WideNet), SGD as published
  (b) loader    dist_cnn's DataLoader path (loader.LoaderPipeline, 2 workers) + Trainer.train_step
  (c) device    dist_cnn's device-resident path (loader.DevicePipeline) + Trainer.train_step
  (d) hand      the baseline: a preloaded, normalized float tensor, random index batches, model, loss,
                backward, SGD step: nothing else
(b) and (c) run the real Trainer (built from a Config, driven step by step as Trainer.run_epoch does), so
what they cost is what `train.py` pays per step. ws2 = 2 processes x 1 thread, gloo DDP, spawned here
(the library never spawns). The seed model's (c) rows run train.py's default channels_last and, as
"nchw", --no-channels-last (the layout (d) uses); airbench runs configs/fast94.toml's recipe.

Noise: every case is measured once per round, rounds interleaved, each window ~0.4 s (steps planned
from the previous round's rate); the table gives medians and the best window. A target's ratio is the
median over rounds of the ratio of the two windows of one round (measured seconds apart: the load they
saw is alike), which on a shared 2-core machine is far steadier than a ratio of medians. img/CPU-s
(images per CPU-second of this process's threads, its DataLoader workers and both ranks) is robust to
other load for 1-thread processes but counts OpenMP spin-waiting. Epoch starts (the plan, DataLoader
worker start-up) are kept out of the timed windows.

FLOPs: FlopCounterMode over one training step (forward + backward) / batch (seed: 10.39 MFLOP, airbench:
708 MFLOP). The ceiling: torch.mm of 2048x2048 in fp32 and bf16 measured in the same rounds, its best
window; utilization = FLOP/image x images/s / ceiling.

    python benchmarks/throughput.py [--quick] [--data-dir data/cifar10-jpeg] [--json PATH] [--profile]
                                    [--rounds N] [--threads T] [--no-ws2] [--no-airbench] [--malloc-tune]
Results (JSON) go to benchmarks/results/throughput.json by default: not for committing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's benchmarks and dist_cnn

from benchmarks import tutorial  # noqa: E402
from benchmarks.common import CIFAR_DIR, RESULTS, ROOT, Stamp, cpu_seconds, free_port, parser  # noqa: E402
from dist_cnn import config as config_mod  # noqa: E402
from dist_cnn.config import Config, DataConfig  # noqa: E402
from dist_cnn.data.datasets import load_dataset  # noqa: E402
from dist_cnn.data.loader import Normalize  # noqa: E402
from dist_cnn.distributed import process_group as D  # noqa: E402
from dist_cnn.models.registry import build_model  # noqa: E402
from dist_cnn.train.allocator import tune_malloc  # noqa: E402
from dist_cnn.train.precision import cpu_has_native_bf16  # noqa: E402
from dist_cnn.train.trainer import Trainer  # noqa: E402

DTYPE = {"fp32": None, "bf16": torch.bfloat16}


def log(msg: str) -> None:
    print(msg, flush=True)


def child_pids() -> list[int]:
    """Live child processes (DataLoader workers; idle ones add no CPU time to a window)."""
    me, pids = str(os.getpid()), []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1] == me:
                    pids.append(int(d))
            except (OSError, IndexError):
                pass
    return pids


# ------------------------------------------------------------------------------------------- data


def get_data(data_dir: str):
    """(Dataset, source note). The shared JPEG copy of CIFAR-10, else synthetic data of its shape."""
    if os.path.isdir(os.path.join(data_dir, "train")) and os.path.isdir(os.path.join(data_dir, "test")):
        return load_dataset(DataConfig(dataset="imagefolder", data_dir=data_dir)), f"imagefolder {data_dir}"
    log(f"NOTE: {data_dir} has no train/ and test/: using SYNTHETIC data of CIFAR-10's shape (50000 x 3x32x32)")
    d = load_dataset(DataConfig(dataset="synthetic", synthetic_train_size=50000, synthetic_test_size=10000))
    return d, "synthetic (CIFAR-10 shape)"


def synthetic_imagefolder(d, n: int = 5000) -> str:
    """For the tutorial path without the real files: the first n synthetic images as PNGs in ImageFolder layout."""
    from PIL import Image

    root = tempfile.mkdtemp(prefix="throughput-imgs-")
    for i in range(n):
        folder = os.path.join(root, "train", d.classes[int(d.train_y[i])])
        os.makedirs(folder, exist_ok=True)
        Image.fromarray(d.train_x[i].permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i}.png"))
    os.makedirs(os.path.join(root, "test"), exist_ok=True)
    return root


# ------------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    name: str
    path: str  # tutorial | loader | device | hand | peak
    model: str
    batch: int  # global batch
    precision: str
    ws: int = 1
    threads: int = 2
    channels_last: bool | None = None
    warmup: int = 2
    steps: int = 10  # the first window's steps; later ones aim at target_s from the last rate
    target_s: float = 0.4
    max_steps: int = 2000
    note: str = ""
    ips: list = field(default_factory=list)  # images/s (FLOP/s for the peak), wall clock
    cpu_ips: list = field(default_factory=list)  # images per CPU-second (all threads, ranks and workers)
    runner: object = None

    def plan_next(self, rate_steps_per_s: float) -> None:
        self.steps = max(1, min(self.max_steps, round(self.target_s * rate_steps_per_s)))


def training_flops_per_image(model_name: str, batch: int, x: torch.Tensor, y: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(model_name, 3, 10, 32)
    if hasattr(model, "init_from_data"):
        model.init_from_data(x[:256])
    with FlopCounterMode(display=False) as fc:
        F.cross_entropy(model(x[:batch]), y[:batch]).backward()
    return fc.get_total_flops() / batch


# ---- (a) the tutorial's pipeline


class TutorialRunner:
    """benchmarks/tutorial.py's training loop, verbatim in what it does per step (incl. loss.item())."""

    def __init__(self, image_dir: str, batch: int):
        import torchvision
        import torchvision.transforms as transforms

        torch.manual_seed(0)
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
        trainset = torchvision.datasets.ImageFolder(os.path.join(image_dir, "train"), transform=transform)
        self.loader = torch.utils.data.DataLoader(trainset, batch_size=batch, shuffle=True, num_workers=2)
        self.model = tutorial.NETS["wide"]()  # the seed architecture, the tutorial's way
        self.criterion = torch.nn.CrossEntropyLoss()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.001, momentum=0.9)
        self.it, self.left = None, 0

    def ensure(self, n):  # keep epoch starts (worker start-up) out of the timed window
        if self.left < n:
            self.it, self.left = iter(self.loader), len(self.loader)

    def run(self, n):
        running = 0.0
        for _ in range(n):
            inputs, labels = next(self.it)
            self.optimizer.zero_grad()
            loss = self.criterion(self.model(inputs), labels)
            loss.backward()
            self.optimizer.step()
            running += loss.item()
        self.left -= n


# ---- (b), (c) dist_cnn's Trainer


def make_config(model: str, batch: int, precision: str, loader: str, channels_last: bool | None, out: str) -> Config:
    cfg = Config()
    if model == "airbench":  # the fast94 recipe, as train.py --config configs/fast94.toml runs it
        config_mod.apply_dict(cfg, config_mod.load_file(str(ROOT / "configs" / "fast94.toml")))
    cfg.model.name = model
    cfg.data.dataset = "imagefolder"
    cfg.data.loader, cfg.data.workers = loader, 2
    if channels_last is not None:
        cfg.model.channels_last = channels_last
    cfg.train.batch_size, cfg.train.precision = batch, precision
    cfg.train.epochs, cfg.train.eval_every = 100_000, 0  # a schedule long enough that it never ends here
    cfg.ckpt.every_minutes, cfg.ckpt.every_steps = 0, 0
    cfg.log.out, cfg.log.progress, cfg.log.wandb = out, False, "disabled"
    return cfg


class TrainerRunner:
    """A real dist_cnn Trainer given the shared data; run(n) is Trainer.run_steps(n)."""

    def __init__(self, cfg: Config, env: D.DistEnv, data):
        self.tr = Trainer(cfg, env, data=data)
        self.tr.progress.update = lambda *a, **k: None  # log_train still runs; no progress lines on stdout

    def ensure(self, n):  # finish an almost used-up epoch outside the timed window
        left = self.tr.steps_per_epoch - self.tr.epoch_step
        if left < n:
            self.tr.run_steps(left)

    def run(self, n):
        self.tr.run_steps(n)


# ---- (d) the hand-written loop


class HandRunner:
    """x = preloaded normalized float tensor; random index batches; model, loss, backward, step."""

    def __init__(self, model_name: str, xf: torch.Tensor, y: torch.Tensor, batch: int, precision: str, ddp=False):
        torch.manual_seed(0)
        model = build_model(model_name, 3, 10, 32)
        if hasattr(model, "init_from_data"):
            model.init_from_data(xf[:5000])
        if ddp:
            model = torch.nn.parallel.DistributedDataParallel(model)
        self.model, self.xf, self.y, self.batch, self.precision = model, xf, y, batch, precision
        self.opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)

    def ensure(self, n):
        pass

    def run(self, n):
        ctx = torch.autocast("cpu", dtype=DTYPE[self.precision]) if DTYPE[self.precision] else contextlib.nullcontext()
        for _ in range(n):
            idx = torch.randint(0, len(self.xf), (self.batch,))
            with ctx:
                loss = F.cross_entropy(self.model(self.xf[idx]), self.y[idx])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()


# ---- the ceiling


class PeakRunner:
    def __init__(self, dtype, threads, n=2048):
        self.threads = threads
        g = torch.Generator().manual_seed(0)
        self.a = torch.randn(n, n, generator=g).to(dtype)
        self.b = torch.randn(n, n, generator=g).to(dtype)
        self.flops = 2 * n**3

    def ensure(self, n):
        pass

    def run(self, n):
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        for _ in range(n):
            torch.mm(self.a, self.b)
        torch.set_num_threads(before)


def measure(case: Case) -> None:
    """One timed window: appends images/s (FLOP/s for the peak), wall clock and per CPU-second."""
    r = case.runner
    r.ensure(case.warmup + case.steps)
    r.run(case.warmup)
    pids = child_pids() if case.path in ("tutorial", "loader") else []
    c0, t0 = cpu_seconds(pids), time.perf_counter()
    r.run(case.steps)
    dt, cpu = time.perf_counter() - t0, cpu_seconds(pids) - c0
    work = case.steps * (r.flops if case.path == "peak" else case.batch)
    case.ips.append(work / dt)
    case.cpu_ips.append(work / max(cpu, 1e-9))
    case.plan_next(case.steps / dt)


# ------------------------------------------------------------------------------------------- ws2 workers


def _ws2_worker(rank, world, port, specs, data_dir, cmd_q, res_q, malloc_tune=False):
    if malloc_tune:
        tune_malloc()
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    try:
        env = D.setup("gloo", 300.0)
        import torch.distributed as dist

        data, _ = get_data(data_dir)
        mean, std = data.normalization("dataset")  # what the Trainer uses
        xf = None
        runners, outdir = {}, tempfile.mkdtemp(prefix=f"throughput-ws2-r{rank}-")
        for s in specs:
            if s["path"] == "device":
                cfg = make_config(
                    s["model"],
                    s["batch"],
                    s["precision"],
                    "device",
                    s["channels_last"],
                    os.path.join(outdir, s["name"]),
                )
                runners[s["name"]] = TrainerRunner(cfg, env, data)
            elif s["path"] == "hand":
                if xf is None:
                    xf = Normalize(mean, std, "cpu", False)(data.train_x)
                runners[s["name"]] = HandRunner(
                    s["model"], xf, data.train_y, s["batch"] // world, s["precision"], ddp=True
                )
        res_q.put(("ready", rank, None))
        while True:
            msg = cmd_q.get()
            if msg is None:
                break
            name, warmup, steps = msg
            r = runners[name]
            r.ensure(warmup + steps)
            r.run(warmup)
            dist.barrier()
            c0, t0 = time.process_time(), time.perf_counter()
            r.run(steps)
            dist.barrier()
            res_q.put(("result", rank, (time.perf_counter() - t0, time.process_time() - c0)))
        D.teardown()
        shutil.rmtree(outdir, ignore_errors=True)
    except Exception as e:  # report instead of hanging the parent
        import traceback

        res_q.put(("error", rank, f"{e}\n{traceback.format_exc()}"))


class WS2Pool:
    def __init__(self, specs, data_dir, malloc_tune=False):
        import torch.multiprocessing as mp

        ctx = mp.get_context("spawn")
        port = free_port()
        self.cmd = [ctx.Queue() for _ in range(2)]
        self.res = ctx.Queue()
        self.procs = [
            ctx.Process(
                target=_ws2_worker, args=(r, 2, port, specs, data_dir, self.cmd[r], self.res, malloc_tune), daemon=True
            )
            for r in range(2)
        ]
        for p in self.procs:
            p.start()
        for _ in range(2):
            kind, who, err = self.res.get(timeout=600)
            if kind == "error":
                raise RuntimeError(f"ws2 rank {who} failed:\n{err}")

    def measure(self, case: Case) -> None:
        for q in self.cmd:
            q.put((case.name, case.warmup, case.steps))
        dts, cpus = [], []
        for _ in range(2):
            kind, who, res = self.res.get(timeout=1800)
            if kind == "error":
                raise RuntimeError(f"ws2 rank {who} failed:\n{res}")
            dts.append(res[0])
            cpus.append(res[1])
        dt, images = max(dts), case.steps * case.batch
        case.ips.append(images / dt)
        case.cpu_ips.append(images / max(sum(cpus), 1e-9))
        case.plan_next(case.steps / dt)

    def close(self):
        for q in self.cmd:
            q.put(None)
        for p in self.procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


# ------------------------------------------------------------------------------------------- profile


def profile_paths(runners: dict[str, object], steps: int = 20) -> str:
    """torch.profiler's self-CPU-time table for the given runners (for explaining (c) vs (d))."""
    from torch.profiler import ProfilerActivity, profile

    out = []
    for name, r in runners.items():
        r.ensure(steps + 5)
        r.run(5)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            r.run(steps)
        out.append(
            f"--- {name}: {steps} steps ---\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18)
        )
    return "\n".join(out)


# ------------------------------------------------------------------------------------------- main


def parse_args(argv):
    ap = parser(
        __doc__, "CIFAR-10 as an image folder (train/, test/); synthetic data of its shape without one", CIFAR_DIR
    )
    ap.set_defaults(json=str(RESULTS / "throughput.json"))
    ap.add_argument("--quick", action="store_true", help="fewer steps and rounds: a smoke run (~2 min)")
    ap.add_argument(
        "--rounds", type=int, default=None, help="interleaved rounds of the seed cases (default 9, quick 3)"
    )
    ap.add_argument(
        "--airbench-rounds", type=int, default=None, help="rounds of the airbench cases (default 3, quick 1)"
    )
    ap.add_argument(
        "--threads", type=int, default=2, help="torch threads of the world-size-1 cases (default 2: all cores)"
    )
    ap.add_argument("--no-ws2", action="store_true", help="skip the 2-process gloo DDP cases")
    ap.add_argument("--no-airbench", action="store_true", help="skip the airbench cases")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler tables of (c) vs (d)")
    ap.add_argument(
        "--malloc-tune",
        action="store_true",
        help="glibc mallopt: no mmap/trim of freed buffers, so steps stop page-faulting (dist_cnn.train.allocator)",
    )
    args = ap.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 9)
    args.airbench_rounds = min(args.rounds, args.airbench_rounds or (1 if args.quick else 3))
    return args


def plan_cases(args) -> tuple[list[Case], list[Case]]:
    """The table's rows: world-size-1 cases (measured here) and world-size-2 cases (spawned ranks).
    Each window aims at target_s seconds (steps from the previous round's rate; the first from ~5000
    img/s for the seed model); airbench (~70x the seed model's FLOPs) runs one step a window."""
    quick, threads = args.quick, args.threads
    seed_s = 0.15 if quick else 0.4
    first = {4: 150, 64: 25, 256: 6}
    cases: list[Case] = []
    ws2_cases: list[Case] = []

    def add(name, path, model, batch, precision, ws=1, **kw):
        if model == "seed":
            kw.setdefault("steps", max(2, first[batch] // (3 if quick else 1)))
            kw.setdefault("target_s", seed_s)
            kw.setdefault(
                "warmup", {4: 40, 64: 5, 256: 2}[batch] if path in ("device", "hand") else {4: 40, 64: 8, 256: 6}[batch]
            )  # >= the DataLoader's prefetch (2 workers x 2)
        else:
            kw.setdefault("steps", 1)
            kw.setdefault("max_steps", 1)
            kw.setdefault("warmup", 1)
        c = Case(name, path, model, batch, precision, ws=ws, threads=1 if ws == 2 else threads, **kw)
        (cases if ws == 1 else ws2_cases).append(c)

    add("peak fp32 mm2048", "peak", "-", 0, "fp32", warmup=1, steps=3, target_s=0.3, max_steps=20)
    add("peak bf16 mm2048", "peak", "-", 0, "bf16", warmup=1, steps=6, target_s=0.3, max_steps=50)
    if threads != 1:  # one core's rate: x2 is what 2 ranks of 1 thread can reach
        for p in ("fp32", "bf16"):
            cases.append(
                Case(
                    f"peak {p} mm2048 1 thread",
                    "peak",
                    "-",
                    0,
                    p,
                    threads=1,
                    warmup=1,
                    steps=2,
                    target_s=0.3,
                    max_steps=20,
                )
            )
    add("a tutorial seed b4", "tutorial", "seed", 4, "fp32", note="as published")
    for b in (64, 256):
        add(f"a tutorial seed b{b}", "tutorial", "seed", b, "fp32")
        add(f"b loader seed b{b} fp32", "loader", "seed", b, "fp32", note="channels_last (default)")
        for p in ("fp32", "bf16"):
            add(f"c device seed b{b} {p}", "device", "seed", b, p, note="channels_last (default)")
            add(f"c device seed b{b} {p} nchw", "device", "seed", b, p, channels_last=False, note="--no-channels-last")
            add(f"d hand seed b{b} {p}", "hand", "seed", b, p)
            if not args.no_ws2:
                add(f"c device seed b{b} {p} ws2", "device", "seed", b, p, ws=2, note="2 procs x 1 thread, gloo")
                add(f"d hand seed b{b} {p} ws2", "hand", "seed", b, p, ws=2, note="DDP, 2 procs x 1 thread, gloo")
    if not args.no_airbench:
        add("b loader airbench b256 fp32", "loader", "airbench", 256, "fp32", warmup=2, note="fast94 recipe")
        for p in ("fp32", "bf16"):
            add(
                f"c device airbench b256 {p}",
                "device",
                "airbench",
                256,
                p,
                note="fast94 recipe (channels_last, crop+flip, lookahead)",
            )
            add(f"d hand airbench b256 {p}", "hand", "airbench", 256, p)
            if not args.no_ws2:
                add(
                    f"c device airbench b256 {p} ws2",
                    "device",
                    "airbench",
                    256,
                    p,
                    ws=2,
                    note="2 procs x 1 thread, gloo",
                )
    return cases, ws2_cases


def attach_runners(cases: list[Case], data, xf, image_dir: str, tmp: str) -> None:
    for c in cases:
        if c.path == "peak":
            c.runner = PeakRunner(torch.float32 if c.precision == "fp32" else torch.bfloat16, c.threads)
        elif c.path == "tutorial":
            c.runner = TutorialRunner(image_dir, c.batch)
        elif c.path in ("loader", "device"):
            cfg = make_config(
                c.model,
                c.batch,
                c.precision,
                "dataloader" if c.path == "loader" else "device",
                c.channels_last,
                os.path.join(tmp, c.name.replace(" ", "_")),
            )
            c.runner = TrainerRunner(cfg, D.DistEnv(), data)
            if c.channels_last is None:
                c.channels_last = cfg.model.channels_last
        elif c.path == "hand":
            c.runner = HandRunner(c.model, xf, data.train_y, c.batch, c.precision)
            c.channels_last = False


def run_rounds(args, cases: list[Case], ws2_cases: list[Case], pool) -> str | None:
    """Every case once per round, rounds interleaved; returns the profile tables when asked for."""
    for r in range(args.rounds):
        t0 = time.time()
        for c in cases + ws2_cases:
            if c.model == "airbench" and r >= args.airbench_rounds:
                continue
            pool.measure(c) if c.ws == 2 else measure(c)
        log(f"round {r + 1}/{args.rounds}: {time.time() - t0:.0f} s, load average {os.getloadavg()[0]:.2f}")
    if not args.profile:
        return None
    pick = {
        c.name: c.runner
        for c in cases
        if c.name in ("c device seed b64 fp32", "c device seed b64 fp32 nchw", "d hand seed b64 fp32")
    }
    return profile_paths(pick)


class Results:
    """Medians per case, the measured ceiling, and same-round ratios between cases."""

    def __init__(self, cases: list[Case], ws2_cases: list[Case], flops: dict):
        self.all = cases + ws2_cases
        self.by_name = {c.name: c for c in self.all}
        self.med = {c.name: statistics.median(c.ips) for c in self.all if c.ips}
        self.cpu_med = {c.name: statistics.median(c.cpu_ips) for c in self.all if c.cpu_ips}
        # The ceiling: the best window of the run (a peak is what the machine can do; other load only lowers it)
        self.peak = {p: max(next(c for c in cases if c.name == f"peak {p} mm2048").ips) for p in ("fp32", "bf16")}
        self.flops = flops

    def paired(self, num: str, den: str) -> float:
        """Median over rounds of num/den measured in the same round (adjacent windows: similar load)."""
        a, b = self.by_name[num].ips, self.by_name[den].ips
        return statistics.median(x / y for x, y in zip(a, b))

    def rows(self) -> list[dict]:
        med, cpu_med, rows = self.med, self.cpu_med, []
        for c in self.all:
            if c.path == "peak":
                rows.append(
                    dict(
                        name=c.name,
                        path="peak",
                        precision=c.precision,
                        threads=c.threads,
                        gflops_median=med[c.name] / 1e9,
                        gflops_all=[v / 1e9 for v in c.ips],
                        gflops_per_cpu_second_median=cpu_med[c.name] / 1e9,
                    )
                )
                continue
            fpi = self.flops[c.model]
            rows.append(
                dict(
                    name=c.name,
                    path=c.path,
                    model=c.model,
                    batch=c.batch,
                    precision=c.precision,
                    world_size=c.ws,
                    threads_per_rank=c.threads,
                    channels_last=c.channels_last,
                    warmup_steps=c.warmup,
                    last_timed_steps=c.steps,
                    note=c.note,
                    images_per_sec_median=med[c.name],
                    images_per_sec_all=c.ips,
                    images_per_cpu_second_median=cpu_med[c.name],
                    images_per_cpu_second_all=c.cpu_ips,
                    spread_max_over_min=max(c.ips) / min(c.ips),
                    flops_per_image=fpi,
                    gflops=fpi * med[c.name] / 1e9,
                    utilization_pct=100 * fpi * med[c.name] / self.peak[c.precision],
                )
            )
        return rows


def print_table(rows: list[dict], res: Results, args) -> None:
    hdr = (
        f"{'case':34s} {'ws x thr':>8s} {'img/s med':>10s} {'min..max (best)':>15s} {'img/CPU-s':>9s} "
        f"{'MFLOP/img':>9s} {'GFLOP/s':>8s} {'util%':>6s}"
    )
    log("\n" + hdr + "\n" + "-" * len(hdr))
    for row in rows:
        if row["path"] == "peak":
            a = row["gflops_all"]
            log(
                f"{row['name']:34s} {'1 x ' + str(row['threads']):>8s} {row['gflops_median']:9.1f}G "
                f"{min(a):7.1f}..{max(a):<7.1f} {row['gflops_per_cpu_second_median']:8.1f}G {'':>9s} "
                f"{row['gflops_median']:8.1f}"
            )
            continue
        a = row["images_per_sec_all"]
        log(
            f"{row['name']:34s} {row['world_size']:>3d} x {row['threads_per_rank']:<2d} "
            f"{row['images_per_sec_median']:10.0f} {min(a):7.0f}..{max(a):<7.0f} "
            f"{row['images_per_cpu_second_median']:9.0f} {row['flops_per_image'] / 1e6:9.2f} "
            f"{row['gflops']:8.2f} {row['utilization_pct']:6.2f}"
        )
    flops, peak = res.flops, res.peak
    log(
        f"(seed: {flops['seed'] / 1e6:.2f} MFLOP per training image"
        + ("" if args.no_airbench else f"; airbench: {flops['airbench'] / 1e6:.1f} MFLOP")
        + f"; util% = GFLOP/s / the best {args.threads}-thread mm window: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, "
        f"bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s (reference on this CPU, quiet: 222 / 640). img/CPU-s: images "
        f"per CPU-second of this process's threads, its DataLoader workers and both ranks: robust to other "
        f"load for 1-thread processes, but it counts OpenMP spin-waiting)"
    )


def check_targets(res: Results) -> list[dict]:
    checks, lines = [], []

    def check(label, num, den, target):
        if num not in res.med or den not in res.med:
            return
        ratio, pair = res.med[num] / res.med[den], res.paired(num, den)
        cpu_ratio = res.cpu_med[num] / res.cpu_med[den]
        best = max(res.by_name[num].ips) / max(res.by_name[den].ips)
        ok = pair >= target
        checks.append(
            dict(
                label=label,
                numerator=num,
                denominator=den,
                paired_ratio_median=pair,
                ratio_of_medians=ratio,
                ratio_of_best=best,
                per_cpu_second_ratio=cpu_ratio,
                target=target,
                passed=ok,
            )
        )
        lines.append(
            f"{'PASS' if ok else 'FAIL'}  {label}: {pair:.2f}x (target >= {target:g}x; ratio of "
            f"medians {ratio:.2f}x, of bests {best:.2f}x, per CPU-second {cpu_ratio:.2f}x)"
        )

    for b in (64, 256):
        for p in ("fp32", "bf16"):
            check(f"seed b{b} {p}: (c) device / (d) hand loop", f"c device seed b{b} {p}", f"d hand seed b{b} {p}", 1.0)
    check(
        "seed fp32: (c) device b64 / (a) tutorial b4 (as published)",
        "c device seed b64 fp32",
        "a tutorial seed b4",
        10.0,
    )
    check(
        "seed fp32: (c) device b256 / (a) tutorial b4 (as published)",
        "c device seed b256 fp32",
        "a tutorial seed b4",
        10.0,
    )
    check(
        "seed bf16: (c) device b64 / (a) tutorial b4 (as published)",
        "c device seed b64 bf16",
        "a tutorial seed b4",
        10.0,
    )
    log("\nTargets (PASS/FAIL on the median over rounds of the same-round ratio):")
    for line in lines:
        log("  " + line)
    return checks


def other_ratios(res: Results, threads: int) -> tuple[list[str], dict]:
    info, precision_choice = [], {}
    for b in (64, 256):
        for p in ("fp32", "bf16"):
            for num, den, what in (
                (f"c device seed b{b} {p} nchw", f"d hand seed b{b} {p}", "(c, --no-channels-last) / (d)"),
                (f"c device seed b{b} {p}", f"a tutorial seed b{b}", f"(c) / (a) tutorial at b{b}"),
                (f"b loader seed b{b} {p}", f"c device seed b{b} {p}", "(b) loader / (c) device"),
            ):
                if num in res.med and den in res.med:
                    info.append(f"seed b{b} {p}: {what} = {res.paired(num, den):.2f}x")
    for model, b in (("seed", 64), ("seed", 256), ("airbench", 256)):
        for path in ("c device", "d hand"):
            f32, b16 = f"{path} {model} b{b} fp32", f"{path} {model} b{b} bf16"
            if f32 in res.med and b16 in res.med:
                r = res.paired(b16, f32)
                precision_choice[f"{path} {model} b{b}"] = dict(bf16_over_fp32=r, faster="bf16" if r > 1 else "fp32")
                info.append(f"{model} b{b} {path}: bf16 / fp32 = {r:.2f}x -> {'bf16' if r > 1 else 'fp32'} faster")
        f1, f2 = f"c device {model} b{b} fp32", f"c device {model} b{b} fp32 ws2"
        if f1 in res.med and f2 in res.med:
            info.append(
                f"{model} b{b} fp32 (c): ws2 (2x1 thread, gloo) / ws1 (1x{threads} threads) = {res.paired(f2, f1):.2f}x"
            )
    log("\nOther ratios (median over rounds of the same-round ratio):")
    for line in info:
        log("  " + line)
    return info, precision_choice


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stamp = Stamp()
    if args.malloc_tune and not tune_malloc():
        log("NOTE: --malloc-tune: mallopt failed (not glibc?); measuring without it")
        args.malloc_tune = False
    torch.set_num_threads(args.threads)
    load0, t_start = os.getloadavg(), time.time()

    data, source = get_data(args.data_dir)
    mean, std = data.normalization("dataset")  # what the Trainer uses
    xf = Normalize(mean, std, "cpu", False)(data.train_x)  # (d)'s preloaded normalized float tensor
    image_dir = args.data_dir if source.startswith("imagefolder") else synthetic_imagefolder(data)
    tmp = tempfile.mkdtemp(prefix="throughput-runs-")
    cases, ws2_cases = plan_cases(args)
    log(
        f"data: {source}; torch {torch.__version__}, {args.threads} threads; malloc tuned: {args.malloc_tune}; "
        f"load average {load0[0]:.2f}; {len(cases)} ws1 cases + {len(ws2_cases)} ws2 cases, "
        f"{args.rounds} rounds (airbench {args.airbench_rounds})"
    )
    attach_runners(cases, data, xf, image_dir, tmp)
    flops = {
        m: training_flops_per_image(m, 64 if m == "seed" else 32, xf, data.train_y)
        for m in ("seed",) + (() if args.no_airbench else ("airbench",))
    }
    flops["-"] = 0.0

    pool = None
    if ws2_cases:
        keys = ("name", "path", "model", "batch", "precision", "channels_last")
        specs = [{k: getattr(c, k) for k in keys} for c in ws2_cases]
        log("starting 2 spawned ranks (gloo) for the ws2 cases ...")
        pool = WS2Pool(specs, args.data_dir, args.malloc_tune)
    try:
        profile_txt = run_rounds(args, cases, ws2_cases, pool)
    finally:
        if pool:
            pool.close()
        shutil.rmtree(tmp, ignore_errors=True)
        if image_dir != args.data_dir:
            shutil.rmtree(image_dir, ignore_errors=True)

    res = Results(cases, ws2_cases, flops)
    rows = res.rows()
    print_table(rows, res, args)
    checks = check_targets(res)
    info, precision_choice = other_ratios(res, args.threads)
    if profile_txt:
        log("\n" + profile_txt)
    load1 = os.getloadavg()
    spreads = [r["spread_max_over_min"] for r in rows if r["path"] != "peak"]
    noise = (
        f"load average {load0[0]:.2f} at start, {load1[0]:.2f} at end (this process uses {args.threads} "
        f"cores); median max/min spread of a case over rounds {statistics.median(spreads):.2f}x"
    )
    log(f"\nnoise: {noise}; {time.time() - t_start:.0f} s in all")
    out = {
        "data": source,
        "torch": torch.__version__,
        "threads": args.threads,
        "rounds": args.rounds,
        "malloc_tune": args.malloc_tune,
        "airbench_rounds": args.airbench_rounds,
        "quick": args.quick,
        "peak_gflops": {k: v / 1e9 for k, v in res.peak.items()},
        "flops_per_image": {k: v for k, v in flops.items() if k != "-"},
        "results": rows,
        "targets": checks,
        "precision": precision_choice,
        "ratios": info,
        "noise": noise,
        "cpu_native_bf16": cpu_has_native_bf16(),
    }
    if profile_txt:
        out["profile"] = profile_txt
    stamp.write(args.json, out)
    log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
