"""A scaling model of data-parallel training, 1 to 1,024 GPUs, and its check against what runs here.

Weak scaling: the per-GPU batch is fixed (the batch each model is trained with on one GPU), so the global
batch grows with the GPU count. For every model (dist_cnn's `seed`, `airbench`, `resnet18` on CIFAR-10 and
torchvision's `resnet50` on ImageNet) the model projects, at 1, 2, 4, ..., 1024 GPUs (8 per node):

  step = forward + backward + exposed communication + optimizer + per-step agreement all_reduce
  efficiency = step(1 GPU) / step(N GPUs)
  time to target = epochs x dataset images / (N x per-GPU batch / step)

Compute per step: FLOPs of one training step from torch.utils.flop_counter.FlopCounterMode, split per
module into forward and backward, divided by an achieved FLOP rate derived from a published training
throughput (constants below, each with its source), but never below the time to launch the step's
kernels (eager PyTorch, one launch per aten op counted here). `--compute cpu` instead measures forward +
backward on this machine's CPU (1 thread) and projects a cluster of such CPUs on the same network.

Communication: DDP's gradient all_reduce, fp32 gradients (4 bytes per parameter) or 2 bytes with the bf16
compression hook (`--ddp-comm-hook bf16`). Each all_reduce costs alpha-beta (latency per hop plus bytes over
bandwidth) for the algorithms NCCL chooses between: a flat ring, NCCL's tree (a chain inside the node and
a double binary tree across nodes), and a two-level (hierarchical) all_reduce (reduce-scatter over NVLink,
all_reduce of each GPU's shard over its own InfiniBand NIC, all-gather over NVLink); the fastest is taken,
per bucket, as NCCL's tuner does. DDP overlap: gradients become ready in reverse execution order during
backward (each module's at the point its share of the backward FLOPs is done); DDP packs them, in that
order, into buckets (the first 1 MiB, then 25 MiB); a bucket's all_reduce starts when its last gradient is
ready and the previous bucket's is finished; what ends after backward is the exposed part.

Validation (what can be measured here): gloo all_reduce at 2 ranks on loopback for tensors of 64 KiB to
64 MiB, 30 interleaved rounds, the fastest sample of each size (the median is printed beside it); alpha and
beta fitted on every other size, the prediction checked on the rest (|error| <= 25%).

Not modelled: input pipelines, stragglers and jitter, NCCL kernels slowing the compute they overlap with,
BatchNorm and other memory-bound ops beyond what the published throughputs already include. The
projection is what communication allows, an upper bound on efficiency.

    python benchmarks/scaling_model.py [--out DIR] [--quick] [--compute gpu|cpu] [--gpu h100|h200|a100]
                                       [--models seed,...] [--step-syncs 1] [--no-validate] [--markdown]
Writes DIR/scaling_model.json (or --json PATH) and DIR/scaling_model.png (DIR defaults to benchmarks/results).
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's benchmarks and dist_cnn

from benchmarks.common import RESULTS, SYNTHETIC, Stamp, free_port, parser  # noqa: E402
from dist_cnn.models.registry import build_model  # noqa: E402

# ------------------------------------------------------------------------------------------ constants
# Each value is a published figure or a labelled assumption. Units: seconds, bytes, bytes/s, FLOP/s.

GPUS_PER_NODE = 8  # DGX H100 / HGX H100 and H200 systems: 8 GPUs per node on NVSwitch (NVIDIA DGX H100 datasheet)

GPU_SPECS = {
    # HBM bandwidth, NVIDIA H100 Tensor Core GPU datasheet (H100 SXM: 3.35 TB/s) and H200 datasheet (4.8 TB/s);
    # NVLink: 900 GB/s per GPU in total (both directions together) for H100 SXM and H200 SXM (same datasheets).
    "h100": {"name": "H100 SXM 80GB", "hbm_bps": 3.35e12, "nvlink_total_bps": 900e9},
    "h200": {"name": "H200 SXM 141GB", "hbm_bps": 4.8e12, "nvlink_total_bps": 900e9},
    # NVIDIA A100 datasheet, A100 80GB SXM: 2,039 GB/s HBM2e, NVLink 600 GB/s (third generation); DGX A100
    # has 8 ConnectX-6 200 Gb/s HDR InfiniBand adapters for the compute fabric (DGX A100 datasheet).
    "a100": {"name": "A100 SXM 80GB", "hbm_bps": 2.039e12, "nvlink_total_bps": 600e9, "nic_bps": 200e9 / 8},
}
A100_HBM_BPS = GPU_SPECS["a100"]["hbm_bps"]

# Achieved training throughput of the reference runs, on one A100 (published):
# - ResNet-50 v1.5, mixed precision, batch 256: 2,470 img/s on 1 GPU of a DGX A100 80GB (NVIDIA
#   DeepLearningExamples, PyTorch/Classification/ConvNets/resnet50v1.5/README.md, "Training performance").
A100_RESNET50_IMG_S = 2470.0
# The same table, 8 GPUs: 16,621 img/s, i.e. 0.84 of 8 x 2,470 (published multi-GPU efficiency, checked below).
A100_RESNET50_8GPU_IMG_S = 16621.0
# - airbench94: 0.36 PFLOP in 3.83 s on one A100 (github.com/KellerJordan/cifar10-airbench README), i.e. the
#   achieved FLOP rate of 3x3 convolutions on 32x32 CIFAR images at batch 1024, with bf16 and channels_last.
A100_AIRBENCH_FLOPS = 0.36e15 / 3.83
# ASSUMPTION: convnet training is largely memory-bound (BatchNorm, activations, elementwise ops), so an
# H100/H200 runs it faster than an A100 by the HBM bandwidth ratio (1.64x / 2.35x), not by the 3.2x ratio of
# dense tensor-core peaks. This is the least certain constant here; it moves every compute time alike.

# Kernel launch floor. ASSUMPTION: eager PyTorch spends ~6 us of host time per dispatched aten op on a fast
# host (framework + CUDA launch), so a step of K ops takes at least K x 6 us however few FLOPs it has.
LAUNCH_S = 6e-6

# Optimizer: fused SGD with momentum reads param, grad and momentum and writes param and momentum: 20 bytes
# per fp32 parameter at HBM bandwidth (a memory-bound kernel), plus two launches.
OPT_BYTES_PER_PARAM = 20

# Network. Per-direction bandwidths, with ASSUMED achieved fractions (an NCCL all_reduce does not reach
# the wire rate: 0.8 of NVLink and 0.9 of InfiniBand are typical of nccl-tests bus bandwidths).
NVLINK_EFF = 0.8
IB_NIC_BPS = 400e9 / 8  # DGX H100 datasheet: 8x ConnectX-7 400 Gb/s InfiniBand NDR per node, one per GPU
IB_EFF = 0.9

# NCCL's own latency model, NVIDIA/nccl src/graph/tuning.cc (baseLat, hwLat), in microseconds:
# ring, Simple protocol (large buckets): 8.4 base, 3.4 per NVLink step, 9.6 per network step;
# tree, LL128 protocol: 4.4 base, 1.2 per NVLink hop, 8.5 per network hop. NCCL also caps the tree's bus
# bandwidth at 0.9 of the ring's (`busBw*.9`).
RING_BASE_S, RING_NVLINK_S, RING_NET_S = 8.4e-6, 3.4e-6, 9.6e-6
TREE_BASE_S, TREE_NVLINK_S, TREE_NET_S = 4.4e-6, 1.2e-6, 8.5e-6
TREE_BW_FACTOR = 0.9

# DDP bucketing (torch.nn.parallel.DistributedDataParallel defaults): bucket_cap_mb=25, and the first
# bucket (the last layers' gradients) is capped at torch.distributed._DEFAULT_FIRST_BUCKET_BYTES = 1 MiB.
DDP_BUCKET_BYTES = 25 * 1024 * 1024
DDP_FIRST_BUCKET_BYTES = 1024 * 1024

GPU_COUNTS = [2**i for i in range(11)]  # 1 .. 1024


@dataclass
class Workload:
    model: str
    per_gpu_batch: int
    image_size: int
    num_classes: int
    dataset_images: int
    epochs: float
    target: str
    # Largest global batch at which the epochs above are known to reach the target; beyond it the epoch
    # count (and the recipe) must change, so time to target is marked "*".
    max_global_batch: int
    a100_flops: float  # achieved FLOP/s on one A100 (reference above)
    note: str = ""


WORKLOADS = [
    # The default recipe: batch 128, 2 epochs, ~65% (this project's README, measured on the shared CIFAR-10).
    # ASSUMPTION: CIFAR recipes with SGD are published up to global batches of a few thousand; 4,096 here.
    Workload(
        "seed",
        128,
        32,
        10,
        50_000,
        2,
        "~65% CIFAR-10",
        4096,
        A100_AIRBENCH_FLOPS,
        "default recipe; tiny model: launch-bound on a GPU",
    ),
    # airbench94: batch 1024, 9.9 epochs to 94.01% (cifar10-airbench README / airbench94.py).
    Workload("airbench", 1024, 32, 10, 50_000, 9.9, "94% CIFAR-10", 4096, A100_AIRBENCH_FLOPS, "airbench94 recipe"),
    # ASSUMPTION: ResNet-18 at batch 256 per GPU with a one-cycle schedule reaches ~94% in ~40 epochs; the
    # achieved FLOP rate is airbench's (same 3x3 convolutions on 32x32 images).
    Workload("resnet18", 256, 32, 10, 50_000, 40, "~94% CIFAR-10", 4096, A100_AIRBENCH_FLOPS, "epochs assumed"),
    # ResNet-50 v1.5, batch 256 per GPU, 90 epochs to 77.1% top-1 (DeepLearningExamples README, DGX A100);
    # Goyal et al. 2017 ("Accurate, Large Minibatch SGD") keep that accuracy up to a global batch of 8,192.
    Workload("resnet50", 256, 224, 1000, 1_281_167, 90, "~77% ImageNet top-1", 8192, 0.0, "torchvision resnet50"),
]


# ------------------------------------------------------------------------------------------ profiling


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops a step dispatches (views excluded: they launch no kernel)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not getattr(func, "is_view", False) and func.overloadpacket.__name__ not in ("detach", "t"):
            self.count += 1
        return func(*args, **(kwargs or {}))


def build(w: Workload) -> nn.Module:
    if w.model == "resnet50":
        import torchvision

        return torchvision.models.resnet50(num_classes=w.num_classes)
    return build_model(w.model, in_channels=3, num_classes=w.num_classes, image_size=w.image_size)


@dataclass
class Profile:
    """One training step at batch 1 (FLOPs scale linearly with the batch; op counts do not)."""

    params: int
    fwd_flops: float
    bwd_flops: float
    fwd_ops: int
    bwd_ops: int
    # Gradients in the order they become ready in backward: (bytes at 4 B/param, fraction of backward done)
    ready: list = field(default_factory=list)


def profile(w: Workload, batch: int = 2) -> Profile:
    model = build(w)
    x = torch.randn(batch, 3, w.image_size, w.image_size)
    order = []  # leaf modules with parameters, in forward execution order
    hooks = [
        m.register_forward_hook(lambda m, i, o: order.append(m) if m not in order else None)
        for m in model.modules()
        if any(True for _ in m.parameters(recurse=False))
    ]
    names = {m: n for n, m in model.named_modules()}
    with torch.no_grad(), FlopCounterMode(display=False) as fwd_only:
        model(x)
    fc = FlopCounterMode(display=False)
    with fc:
        model(x).sum().backward()
    for h in hooks:
        h.remove()
    ops_f, ops_b = _OpCounter(), _OpCounter()
    with ops_f:
        loss = model(x).sum()
    with ops_b:
        loss.backward()
    fwd_counts, all_counts = fwd_only.get_flop_counts(), fc.get_flop_counts()

    def flops(counts, m):
        return sum(counts.get(_flop_key(model, names[m]), {}).values())

    bwd = [flops(all_counts, m) - flops(fwd_counts, m) for m in order]
    total_bwd = sum(bwd) or 1.0
    ready, done = [], 0.0
    for m, b in zip(reversed(order), reversed(bwd)):  # backward runs the modules in reverse
        done += b
        nbytes = 4 * sum(p.numel() for p in m.parameters(recurse=False) if p.requires_grad)
        if nbytes:
            ready.append((nbytes, done / total_bwd))
    fwd_total = fwd_only.get_total_flops()
    return Profile(
        params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        fwd_flops=fwd_total / batch,
        bwd_flops=(fc.get_total_flops() - fwd_total) / batch,
        fwd_ops=ops_f.count,
        bwd_ops=ops_b.count,
        ready=ready,
    )


def _flop_key(model: nn.Module, name: str) -> str:
    """FlopCounterMode names modules '<RootClass>.<dotted name>'."""
    root = type(model).__name__
    return f"{root}.{name}" if name else root


def cpu_step_seconds(w: Workload, batch: int, repeats: int = 5) -> tuple[float, float]:
    """Measured forward and backward seconds on this CPU, 1 thread, fp32, at `batch`."""
    torch.set_num_threads(1)
    model = build(w)
    x = torch.randn(batch, 3, w.image_size, w.image_size)
    y = torch.randint(0, w.num_classes, (batch,))
    fwd, bwd = [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        loss = nn.functional.cross_entropy(model(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if i:  # the first step allocates and warms caches
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    return statistics.median(fwd), statistics.median(bwd)


# ------------------------------------------------------------------------------------------ network


@dataclass
class Net:
    gpus_per_node: int
    nvlink_bps: float  # achieved, per direction
    nic_bps: float  # achieved, per GPU (one NIC each), per direction


def allreduce_seconds(nbytes: float, gpus: int, net: Net) -> tuple[float, str]:
    """Time of one all_reduce of nbytes over `gpus` GPUs: the fastest of ring, tree and two-level."""
    if gpus == 1:
        return 0.0, "-"
    g = min(gpus, net.gpus_per_node)
    nodes = gpus // g
    # A flat ring crosses every node boundary once per channel; NCCL spreads its channels over the node's
    # NICs, so across nodes the ring's bus bandwidth is the node's NICs together (g x nic), capped by NVLink.
    bus = net.nvlink_bps if nodes == 1 else min(net.nvlink_bps, g * net.nic_bps)
    steps, inter_steps = 2 * (gpus - 1), 2 * (nodes - 1)
    ring = (
        RING_BASE_S
        + (steps - inter_steps) * RING_NVLINK_S
        + inter_steps * RING_NET_S
        + 2 * (gpus - 1) / gpus * nbytes / bus
    )
    tree = (
        TREE_BASE_S
        + 2 * ((g - 1) * TREE_NVLINK_S + math.ceil(math.log2(nodes)) * TREE_NET_S)
        + 2 * nbytes / (TREE_BW_FACTOR * bus)
    )
    options = {"ring": ring, "tree": tree}
    if nodes > 1:
        # Two-level: reduce-scatter and all-gather over NVLink inside the node, and in between each GPU
        # all_reduces its 1/g shard with its peers on the other nodes through its own NIC (ring or tree).
        intra = 2 * ((g - 1) * RING_NVLINK_S + (g - 1) / g * nbytes / net.nvlink_bps)
        shard = nbytes / g
        inter = min(
            2 * (nodes - 1) * RING_NET_S + 2 * (nodes - 1) / nodes * shard / net.nic_bps,
            2 * math.ceil(math.log2(nodes)) * TREE_NET_S + 2 * shard / (TREE_BW_FACTOR * net.nic_bps),
        )
        options["2-level"] = RING_BASE_S + intra + inter
    algo = min(options, key=options.get)
    return options[algo], algo


def ddp_buckets(ready: list, bytes_per_grad_byte: float) -> list[tuple[float, float]]:
    """(bucket bytes on the wire, fraction of backward after which its last gradient is ready)."""
    buckets, size, last, cap = [], 0.0, 0.0, DDP_FIRST_BUCKET_BYTES
    for nbytes, when in ready:
        size += nbytes
        last = when
        if size >= cap:
            buckets.append((size * bytes_per_grad_byte, last))
            size, cap = 0.0, DDP_BUCKET_BYTES
    if size:
        buckets.append((size * bytes_per_grad_byte, last))
    return buckets


def exposed_comm(buckets, bwd_s: float, gpus: int, net: Net) -> tuple[float, float, str]:
    """(exposed seconds after backward, total all_reduce seconds, algorithm of the largest bucket)."""
    end, total, algo, biggest = 0.0, 0.0, "-", -1.0
    for nbytes, when in buckets:
        t, a = allreduce_seconds(nbytes, gpus, net)
        end = max(end, when * bwd_s) + t  # one communication stream: buckets run one after another
        total += t
        if nbytes > biggest:
            biggest, algo = nbytes, a
    return max(0.0, end - bwd_s), total, algo


# ------------------------------------------------------------------------------------------ projection


def project(w: Workload, prof: Profile, times, net: Net, grad_bytes: int, step_syncs: int, strong: bool) -> list[dict]:
    """times(batch) -> (forward, backward, optimizer) seconds. Weak scaling: the per-GPU batch is the
    workload's at every GPU count; strong: the global batch stays at the largest known to work."""
    buckets = ddp_buckets(prof.ready, grad_bytes / 4)
    rows, base = [], None
    for n in GPU_COUNTS:
        batch = max(1, w.max_global_batch // n) if strong else w.per_gpu_batch
        fwd_s, bwd_s, opt_s = times(batch)
        exposed, comm, algo = exposed_comm(buckets, bwd_s, n, net)
        sync = step_syncs * allreduce_seconds(16, n, net)[0]  # the trainer's per-step agreement (a few bytes)
        step = fwd_s + bwd_s + exposed + opt_s + sync
        ips = n * batch / step
        base = base or ips
        global_batch = n * batch
        rows.append(
            {
                "gpus": n,
                "nodes": max(1, n // net.gpus_per_node),
                "per_gpu_batch": batch,
                "global_batch": global_batch,
                "step_ms": step * 1e3,
                "compute_ms": (fwd_s + bwd_s + opt_s) * 1e3,
                "allreduce_ms": comm * 1e3,
                "exposed_ms": exposed * 1e3,
                "sync_ms": sync * 1e3,
                "algorithm": algo,
                "efficiency": ips / (n * base),
                "images_per_sec": ips,
                "time_to_target_s": w.epochs * w.dataset_images / ips,
                "beyond_known_batch": global_batch > w.max_global_batch,
                "steps_per_epoch": w.dataset_images / global_batch,
            }
        )
    return rows


def compute_model(w: Workload, prof: Profile, mode: str, gpu: dict, cpu_batch: int):
    """A function batch -> (forward, backward, optimizer) seconds of one GPU (or CPU) step."""
    if mode == "cpu":
        f, b = cpu_step_seconds(w, cpu_batch)
        # FLOPs are linear in the batch; the CPU's per-step overheads are small beside them at these sizes
        return lambda batch: (f * batch / cpu_batch, b * batch / cpu_batch, 0.0)
    speedup = gpu["hbm_bps"] / A100_HBM_BPS
    rate = (w.a100_flops or resnet50_a100_flops()) * speedup

    def times(batch):
        fwd = max(prof.fwd_flops * batch / rate, prof.fwd_ops * LAUNCH_S)
        bwd = max(prof.bwd_flops * batch / rate, prof.bwd_ops * LAUNCH_S)
        opt = OPT_BYTES_PER_PARAM * prof.params / gpu["hbm_bps"] + 2 * LAUNCH_S
        return fwd, bwd, opt

    return times


_R50 = {}


def resnet50_a100_flops() -> float:
    """Achieved FLOP/s of the published ResNet-50 run: its FLOPs per image (counted here) x 2,470 img/s."""
    if "rate" not in _R50:
        p = profile(next(w for w in WORKLOADS if w.model == "resnet50"), batch=1)
        _R50["rate"] = (p.fwd_flops + p.bwd_flops) * A100_RESNET50_IMG_S
    return _R50["rate"]


# ------------------------------------------------------------------------------------------ validation


def _gloo_worker(rank: int, port: int, sizes: list[int], rounds: int, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    tensors = {n: torch.randn(n // 4) for n in sizes}
    times = {n: [] for n in sizes}
    for r in range(rounds + 1):
        for n in sizes:  # interleaved: every round visits every size, so load drift hits all sizes alike
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(tensors[n])
            if r:  # round 0 warms up gloo's buffers and pairs
                times[n].append(time.perf_counter() - t0)
    if rank == 0:
        # The fastest sample: the all_reduce's own cost. On a machine shared with other work the median
        # measures that work's load too (it varied 2x between back-to-back runs here, the minimum far less).
        q.put({n: (min(t), statistics.median(t)) for n, t in times.items()})
    dist.destroy_process_group()


def measure_gloo(sizes: list[int], rounds: int) -> dict[int, tuple[float, float]]:
    """{bytes: (fastest, median) seconds} of a 2-rank gloo all_reduce on loopback, 1 thread per rank."""
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    port = free_port()
    ps = [ctx.Process(target=_gloo_worker, args=(r, port, sizes, rounds, q)) for r in range(2)]
    for p in ps:
        p.start()
    for p in ps:
        p.join()
    if any(p.exitcode for p in ps):
        raise RuntimeError("a gloo measuring process failed")
    return q.get()


def fit_alpha_beta(points: dict[int, float]) -> tuple[float, float]:
    """Least squares in relative error of T = 2 alpha + n beta (a 2-rank ring: 2 steps of n/2 bytes each way,
    beta folding in gloo's copy and reduction), so small and large sizes weigh alike."""
    # minimise sum ((2a + n b - T) / T)^2: a 2x2 normal system in (a, b)
    s11 = s12 = s22 = r1 = r2 = 0.0
    for n, t in points.items():
        u, v = 2 / t, n / t
        s11, s12, s22, r1, r2 = s11 + u * u, s12 + u * v, s22 + v * v, r1 + u, r2 + v
    det = s11 * s22 - s12 * s12
    return (r1 * s22 - r2 * s12) / det, (s11 * r2 - s12 * r1) / det


def validate(quick: bool) -> dict:
    kib = 1024
    sizes = [64 * kib * 2**i for i in range(0, 11, 2 if quick else 1)]
    measured = measure_gloo(sizes, rounds=10 if quick else 30)
    fit_sizes = sorted(set(sizes[::2]) | {sizes[-1]})  # the ends are fitted: the others are interpolated
    alpha, beta = fit_alpha_beta({n: measured[n][0] for n in fit_sizes})
    rows = []
    for n in sizes:
        pred, fastest = 2 * alpha + n * beta, measured[n][0]
        rows.append(
            {
                "bytes": n,
                "measured_ms": fastest * 1e3,
                "median_ms": measured[n][1] * 1e3,
                "predicted_ms": pred * 1e3,
                "error": pred / fastest - 1,
                "fitted": n in fit_sizes,
            }
        )
    held_out = [r for r in rows if not r["fitted"]]
    worst = max(abs(r["error"]) for r in held_out)
    return {
        "alpha_us": alpha * 1e6,
        "bandwidth_GBps": 1 / beta / 1e9,
        "rows": rows,
        "max_held_out_error": worst,
        "pass": worst <= 0.25,
    }


# ------------------------------------------------------------------------------------------ output


def fmt_time(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s" if s >= 1 else f"{s * 1e3:.0f} ms"


def print_model(w: Workload, prof: Profile, rows: list[dict], hook: str):
    mb = 4 * prof.params / 2**20
    print(
        f"\n{w.model}: {prof.params:,} parameters ({mb:.1f} MiB of fp32 gradients, {hook} on the wire), "
        f"{(prof.fwd_flops + prof.bwd_flops) / 1e9:.3f} GFLOP per image, per-GPU batch {w.per_gpu_batch}, "
        f"{w.epochs:g} epochs x {w.dataset_images:,} images to {w.target}"
    )
    print(
        f"  {'GPUs':>5} {'global':>7} {'step ms':>8} {'compute':>8} {'allred.':>8} {'exposed':>8} "
        f"{'algo':>7} {'eff.':>6} {'img/s':>11} {'to target':>10}"
    )
    for r in rows:
        star = "*" if r["beyond_known_batch"] else " "
        target = fmt_time(r["time_to_target_s"]) if r["steps_per_epoch"] >= 1 else "<1 step/ep"
        print(
            f"  {r['gpus']:>5} {r['global_batch']:>7} {r['step_ms']:>8.2f} {r['compute_ms']:>8.2f} "
            f"{r['allreduce_ms']:>8.2f} {r['exposed_ms'] + r['sync_ms']:>8.3f} {r['algorithm']:>7} "
            f"{r['efficiency']:>6.3f} {r['images_per_sec']:>11,.0f} {target:>10}{star}"
        )


def stops_scaling(rows: list[dict], floor: float = 0.9) -> int | None:
    """The first GPU count whose efficiency falls below `floor`."""
    return next((r["gpus"] for r in rows if r["efficiency"] < floor), None)


def markdown(results: dict) -> str:
    shown = [1, 8, 64, 256, 1024]
    head = "| model, batch | " + " | ".join(f"{n} GPU{'s' if n > 1 else ''}" for n in shown) + " |"
    lines = [head, "|---|" + "---|" * len(shown)]
    for name, res in results.items():
        if name.startswith("_"):
            continue
        for hook in ("fp32", "bf16", "strong"):
            rows = {r["gpus"]: r for r in res[hook]}
            cells = []
            for n in shown:
                r = rows[n]
                t = fmt_time(r["time_to_target_s"]) if r["steps_per_epoch"] >= 1 else "<1 step/epoch"
                t += "\\*" if r["beyond_known_batch"] else ""
                cells.append(f"{r['efficiency']:.2f} / {t}")
            label = {
                "fp32": f"`{name}`, {res['per_gpu_batch']}/GPU",
                "bf16": f"`{name}`, {res['per_gpu_batch']}/GPU, bf16 hook",
                "strong": f"`{name}`, global {res['workload']['max_global_batch']}",
            }[hook]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, (name, res) in enumerate(k for k in results.items() if not k[0].startswith("_")):
        color = f"C{i}"
        labels = {
            "fp32": f"{name}, {res['per_gpu_batch']}/GPU",
            "bf16": f"{name}, {res['per_gpu_batch']}/GPU, bf16 hook",
            "strong": f"{name}, global batch {res['workload']['max_global_batch']}",
        }
        for hook, style in (("fp32", "-"), ("bf16", "--"), ("strong", ":")):
            rows = res[hook]
            ax.plot(
                [r["gpus"] for r in rows],
                [r["efficiency"] for r in rows],
                style,
                color=color,
                marker="o",
                markersize=3,
                label=labels[hook],
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks(GPU_COUNTS, [str(n) for n in GPU_COUNTS])
    ax.set_xlabel("GPUs (8 per node)")
    ax.set_ylabel("scaling efficiency")
    ax.set_ylim(0, 1.05)
    ax.grid(True, alpha=0.3)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6.5, ncol=2, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def make_net(gpu: dict) -> Net:
    return Net(GPUS_PER_NODE, gpu["nvlink_total_bps"] / 2 * NVLINK_EFF, gpu.get("nic_bps", IB_NIC_BPS) * IB_EFF)


def published_check(prof: Profile, step_syncs: int) -> tuple[float, float]:
    """(model, published) efficiency of ResNet-50 on the 8 A100s of one DGX A100 (NVLink only)."""
    w = next(w for w in WORKLOADS if w.model == "resnet50")
    gpu = GPU_SPECS["a100"]
    rows = project(w, prof, compute_model(w, prof, "gpu", gpu, 0), make_net(gpu), 4, step_syncs, strong=False)
    return rows[3]["efficiency"], A100_RESNET50_8GPU_IMG_S / (8 * A100_RESNET50_IMG_S)


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, SYNTHETIC)
    p.add_argument("--out", default=str(RESULTS), help="folder for the PNG, and the JSON unless --json names one")
    p.add_argument("--quick", action="store_true", help="fewer sizes and rounds in the validation")
    p.add_argument(
        "--compute",
        choices=("gpu", "cpu"),
        default="gpu",
        help="gpu: FLOPs / published achieved rate (default); cpu: measured here, 1 thread",
    )
    p.add_argument("--gpu", choices=sorted(GPU_SPECS), default="h100", help="GPU the projection is for")
    p.add_argument("--cpu-batch", type=int, default=16, help="--compute cpu: batch measured (scaled linearly)")
    p.add_argument(
        "--step-syncs",
        type=int,
        default=1,
        help="small blocking all_reduces per step outside DDP (dist_cnn's per-step agreement: 1)",
    )
    p.add_argument("--models", default="seed,airbench,resnet18,resnet50", help="comma-separated subset")
    p.add_argument("--no-validate", action="store_true", help="skip the gloo measurement")
    p.add_argument("--markdown", action="store_true", help="also print the summary as a Markdown table")
    a = p.parse_args(argv)
    stamp = Stamp()
    out = Path(a.out)
    json_path = Path(a.json or out / "scaling_model.json")
    out.mkdir(parents=True, exist_ok=True)
    gpu = GPU_SPECS[a.gpu]
    net = make_net(gpu)
    compute = gpu["name"] if a.compute == "gpu" else "this CPU, 1 thread, fp32 (measured)"
    print(
        f"Weak scaling, per-GPU batch fixed. Compute: {compute}. Network: {GPUS_PER_NODE} GPUs per node, "
        f"NVLink {net.nvlink_bps / 1e9:.0f} GB/s, InfiniBand {net.nic_bps / 1e9:.0f} GB/s per GPU "
        f"(achieved, per direction). DDP buckets 1 MiB + 25 MiB."
    )
    print(
        "Columns: exposed = all_reduce time not hidden under backward + the per-step agreement all_reduce; "
        "* = global batch beyond the largest known to reach the target in these epochs."
    )
    results: dict = {
        "_constants": {
            "gpu": gpu,
            "gpus_per_node": GPUS_PER_NODE,
            "nvlink_bps": net.nvlink_bps,
            "nic_bps": net.nic_bps,
            "launch_s": LAUNCH_S,
            "compute": a.compute,
            "step_syncs": a.step_syncs,
        }
    }
    profiles = {}
    for w in WORKLOADS:
        if w.model not in a.models.split(","):
            continue
        prof = profiles[w.model] = profile(w)
        times = compute_model(w, prof, a.compute, gpu, a.cpu_batch)
        fwd, bwd, opt = times(w.per_gpu_batch)
        res = {
            "workload": asdict(w),
            "per_gpu_batch": w.per_gpu_batch,
            "params": prof.params,
            "flops_per_image": prof.fwd_flops + prof.bwd_flops,
            "ops_per_step": prof.fwd_ops + prof.bwd_ops,
            "fwd_ms": fwd * 1e3,
            "bwd_ms": bwd * 1e3,
            "opt_ms": opt * 1e3,
        }
        for hook, grad_bytes in (("fp32", 4), ("bf16", 2)):
            res[hook] = project(w, prof, times, net, grad_bytes, a.step_syncs, strong=False)
        res["strong"] = project(w, prof, times, net, 4, a.step_syncs, strong=True)
        results[w.model] = res
        print_model(w, prof, res["fp32"], "fp32")
        bf16 = {r["gpus"]: r for r in res["bf16"]}
        print(
            "  with the bf16 hook: efficiency " + ", ".join(f"{n}: {bf16[n]['efficiency']:.3f}" for n in (8, 64, 1024))
        )
        strong = {r["gpus"]: r for r in res["strong"]}
        print(
            f"  strong scaling at a global batch of {w.max_global_batch}: efficiency "
            + ", ".join(f"{n}: {strong[n]['efficiency']:.3f}" for n in (8, 64, 1024))
            + f" (per-GPU batch {strong[1024]['per_gpu_batch']} at 1024)"
        )
        flops_ratio = (prof.fwd_flops + prof.bwd_flops) * w.per_gpu_batch / (4 * prof.params)
        below = stops_scaling(res["fp32"])
        print(
            f"  compute per gradient byte: {flops_ratio:,.0f} FLOP/B; efficiency below 0.9 from "
            f"{below if below else 'never (up to 1024)'} GPUs"
        )
    if "airbench" in results and a.compute == "gpu":
        # Cross-check of the compute side against a published time: airbench94 on one A100 takes 3.83 s.
        r = results["airbench"]
        a100 = (r["flops_per_image"] * 9.9 * 50_000) / A100_AIRBENCH_FLOPS
        print(
            f"\ncheck: the model's airbench94 on one A100 = {a100:.2f} s of compute (published: 3.83 s, "
            "by construction of its achieved rate)"
        )
    if "resnet50" in profiles and a.compute == "gpu":
        model_eff, published = published_check(profiles["resnet50"], a.step_syncs)
        results["_published_check"] = {"model_efficiency": model_eff, "published_efficiency": published}
        print(
            f"check: ResNet-50 on 8 A100s (DGX A100), efficiency {model_eff:.3f} in this model against "
            f"{published:.3f} published (16,621 / 8 x 2,470 img/s): the model counts communication only"
        )
    if not a.no_validate:
        print(
            "\nValidation: gloo all_reduce, 2 ranks on loopback, 1 thread each "
            "(alpha/beta fitted on the sizes marked 'fit', checked on the others)"
        )
        v = validate(a.quick)
        results["_validation"] = v
        print(f"  fitted: alpha {v['alpha_us']:.1f} us, bandwidth {v['bandwidth_GBps']:.2f} GB/s")
        print(f"  {'size':>9} {'fastest ms':>11} {'median ms':>10} {'predicted ms':>13} {'error':>7}")
        for r in v["rows"]:
            size = f"{r['bytes'] // 1024} KiB" if r["bytes"] < 2**20 else f"{r['bytes'] // 2**20} MiB"
            print(
                f"  {size:>9} {r['measured_ms']:>11.3f} {r['median_ms']:>10.3f} {r['predicted_ms']:>13.3f} "
                f"{r['error']:>+7.1%}"
                f"{'  fit' if r['fitted'] else ''}"
            )
        print(
            f"  largest error on held-out sizes: {v['max_held_out_error']:.1%} "
            f"({'PASS' if v['pass'] else 'FAIL'}: <= 25%)"
        )
    stamp.write(json_path, results)
    plot(
        results,
        out / "scaling_model.png",
        f"Projected DDP scaling, {compute}, {GPUS_PER_NODE}/node, NVLink + InfiniBand\n"
        "solid: per-GPU batch fixed; dashed: + bf16 hook; dotted: global batch fixed",
    )
    if a.markdown:
        print("\n" + markdown(results))
    print(f"\nwrote {json_path} and {out / 'scaling_model.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
