"""What the parts of dist_cnn's DDP step cost: A/B in the same two processes, interleaved.

Both ranks build one DDP model per variant (the same weights) and train them in turn, a block of
steps each, many rounds: start-up and the machine's load changes fall on all variants alike. Per
variant: the median over blocks of wall-clock ms/step and of this process's CPU ms/step (rank 0).

  base   the trainer's step without the accounting: the agreement flags in an all_reduce of their
         own started before the backward pass, DDP's built-in all_reduce
  timed  the same with the accounting (rank_times): its clocks, the first layer's gradients-ready
         mark, and every rank's figures in the agreement vector at the end of each block
  novote base without the agreement all_reduce (what the vote costs)
  ddpdef base with DDP's default settings (what dist_cnn's bucket plan, bucket view and static graph give)
  plain  DDP's defaults and no agreement: the plain loop's step
  onebucket, noview, nostatic   novote with one of dist_cnn's DDP settings back at DDP's default:
         one 25 MB bucket instead of the bucket plan, gradient_as_bucket_view off, static_graph off

    python benchmarks/ddp_step_ab.py [--model seed] [--per-rank-batch 64] [--block 20] [--rounds 8]
        [--variants base,novote,...] [--json PATH]
"""

import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's benchmarks and dist_cnn

from benchmarks.common import SYNTHETIC, Stamp, free_port, parser  # noqa: E402
from dist_cnn.config import ModelConfig  # noqa: E402
from dist_cnn.distributed import parallel  # noqa: E402
from dist_cnn.distributed.process_group import DistEnv  # noqa: E402
from dist_cnn.models.registry import build_model  # noqa: E402
from dist_cnn.observability import rank_times as rt  # noqa: E402
from dist_cnn.train.allocator import tune_malloc  # noqa: E402

VARIANTS = ("base", "timed", "novote", "ddpdef", "plain", "onebucket", "noview", "nostatic")
NO_VOTE = ("novote", "plain", "onebucket", "noview", "nostatic")
ONE_DEFAULT = {  # novote's DDP with one setting at DDP's default
    "onebucket": dict(gradient_as_bucket_view=True, static_graph=True),
    "noview": dict(gradient_as_bucket_view=False, static_graph=True),
    "nostatic": dict(gradient_as_bucket_view=True, static_graph=False),
}


def build(variant: str, world: int, model: str):
    torch.manual_seed(0)
    net = build_model(model, 3, 10, 32).to(memory_format=torch.channels_last)
    times = rt.RankTimes(torch.device("cpu")) if variant == "timed" else None
    if variant in ("ddpdef", "plain"):
        ddp = DDP(net)
    elif variant in ONE_DEFAULT:
        plan = {} if variant == "onebucket" else {"bucket_cap_mb_list": parallel.bucket_caps_mb(net)}
        ddp = DDP(net, **ONE_DEFAULT[variant], **plan)
    else:
        ddp, _ = parallel.wrap(net, DistEnv(world_size=world), ModelConfig(), 1, times.grads_ready if times else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9, nesterov=True, foreach=True)
    return ddp, opt, times, variant not in NO_VOTE


def step(ddp, opt, times, vote_on, x, y, rank, world, closing):
    if times:
        times.data_waited(0.0)
    loss = F.cross_entropy(ddp(x), y)
    vec = torch.cat([(~torch.isfinite(loss.detach())).float().view(1), torch.zeros(3)])
    if times:
        vec = torch.cat([vec, rt.slots(rank, world, times.snapshot() if closing else None)])
    vote = parallel.StepVote(vec) if vote_on else None
    loss.backward()
    if times:
        times.backward_done()
    if vote is None or not vote.read()[0]:
        opt.step()
    opt.zero_grad(set_to_none=True)
    if times:
        times.step_end()


def worker(rank, world, port, a, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tune_malloc()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    variants = tuple(a.variants.split(","))
    nets = {v: build(v, world, a.model) for v in variants}
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(a.per_rank_batch, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (a.per_rank_batch,), generator=g)
    wall, cpu = {v: [] for v in variants}, {v: [] for v in variants}
    for r in range(a.rounds + 1):  # round 0 warms up (DDP's first static-graph steps)
        order = variants[r % len(variants) :] + variants[: r % len(variants)]  # each variant first in turn
        for v in order:
            dist.barrier()
            t, c = time.perf_counter(), time.process_time()
            for i in range(a.block):
                step(*nets[v], x, y, rank, world, closing=i == a.block - 1)
            if r:
                wall[v].append((time.perf_counter() - t) / a.block * 1e3)
                cpu[v].append((time.process_time() - c) / a.block * 1e3)
    if rank == 0:
        q.put({v: (statistics.median(wall[v]), statistics.median(cpu[v])) for v in variants})
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__, SYNTHETIC)
    p.add_argument("--model", default="seed")
    p.add_argument("--per-rank-batch", type=int, default=64)
    p.add_argument("--block", type=int, default=20, help="steps of one variant in a row")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument(
        "--variants", default="base,timed,novote,ddpdef,plain", help="comma-separated, the first is the base"
    )
    a = p.parse_args(argv)
    unknown = set(a.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    stamp = Stamp()
    ctx = mp.get_context("spawn")
    q = ctx.SimpleQueue()
    port = free_port()
    ps = [ctx.Process(target=worker, args=(r, 2, port, a, q)) for r in range(2)]
    [p.start() for p in ps]
    res = q.get()
    [p.join() for p in ps]
    print(f"{a.model}, 2 ranks, {a.per_rank_batch} images per rank, {a.rounds} rounds of {a.block} steps")
    base = next(iter(res))
    for v, (w, c) in res.items():
        print(f"  {v:>9}: {w:7.2f} ms/step wall, {c:7.2f} ms/step CPU (rank 0)   / {base}: {w / res[base][0]:.3f}")
    res = {v: {"wall_ms_per_step": w, "cpu_ms_per_step": c} for v, (w, c) in res.items()}
    stamp.report(a.json, {"model": a.model, "per_rank_batch": a.per_rank_batch, "block": a.block, **res})
    return 0


if __name__ == "__main__":
    sys.exit(main())
