"""Data parallelism: how the model is wrapped for DDP (and compiled), with deliberate settings.

On a GPU, gradient buckets are sized to the model (plan_buckets): DDP's default is 25 MiB buckets, so
a model of a few MB sends all its gradients in one all_reduce after the whole backward pass and nothing
overlaps. Here they are cut between layers into buckets of about a quarter of the model, so the
all_reduce of the late layers runs while the early layers are still computing their gradients. On the
CPU, gloo's transfers share the cores with the compute, and DDP's default buckets are kept.

`--ddp-comm-hook` picks how a bucket travels: as it is (none), cast to bf16 or fp16 for the wire and
back (half the bytes), or PowerSGD's low-rank compression (torch.distributed.algorithms.ddp_comm_hooks).
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_cnn.config import ModelConfig
from dist_cnn.distributed.process_group import DistEnv

# torch 2.14 renamed broadcast_buffers; older releases (which pyproject allows) only know the old name.
_SYNC_BUFFERS = (
    "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
)
_PER_BUCKET_CAPS = "bucket_cap_mb_list" in inspect.signature(DDP).parameters
_FIRST_BUCKET_BYTES = getattr(dist, "_DEFAULT_FIRST_BUCKET_BYTES", 1 << 20)  # DDP's own first bucket

BUCKETS = 4  # buckets of about gradient bytes / BUCKETS ...
FIRST_BUCKET = 16  # ... except the first layers' bucket, about bytes / 16: its all_reduce cannot overlap
MIN_BUCKET = 64 << 10  # no bucket target below 64 KiB: each all_reduce has a fixed latency
COMM_HOOKS = ("none", "bf16", "fp16", "powersgd")


def plan_buckets(model: torch.nn.Module) -> list[int]:
    """Bytes of each gradient bucket, in parameter order, cut only between layers.

    DDP fills buckets in parameter order and closes one as soon as it reaches its size limit (with
    static_graph it keeps that assignment; it all-reduces the buckets in reverse, as the backward pass
    readies them). Giving each bucket its exact size as the limit makes DDP cut where planned: never
    inside a layer, the first layers in a small bucket of their own (the only all_reduce that cannot
    overlap with any backward compute), then buckets of about a quarter of the model."""
    layers: dict[str, int] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            layer = name.rpartition(".")[0]
            layers[layer] = layers.get(layer, 0) + p.numel() * p.element_size()
    total = sum(layers.values())
    buckets, size = [], 0
    for nbytes in layers.values():
        target = max(total / (FIRST_BUCKET if not buckets else BUCKETS), MIN_BUCKET)
        if size and size + nbytes > target:
            buckets.append(size)
            size = 0
        size += nbytes
    return buckets + [size] if size else buckets


def bucket_caps_mb(model: torch.nn.Module) -> list[float]:
    return [b / 2**20 for b in plan_buckets(model)]


def bucket_args(model: torch.nn.Module, device: torch.device, cfg: ModelConfig) -> dict:
    """DDP's bucket sizes: the plan on a GPU, where NCCL moves a bucket while the backward pass
    computes the next. On the CPU, DDP's default size: gloo's threads take the cores the backward
    pass computes on, so there is no overlap to gain, and each further all_reduce costs its fixed
    latency (see docs/performance-ddp.md)."""
    if cfg.ddp_comm_hook == "powersgd":
        # PowerSGD chains two all_reduces per bucket from completion callbacks; with several buckets
        # those chains interleave differently on different ranks (gloo then aborts on mismatched
        # sizes), so all gradients go in one bucket: one chain a step, in the same order everywhere.
        caps = [sum(bucket_caps_mb(model))]
    elif device.type == "cuda":
        caps = bucket_caps_mb(model)
    else:
        return {}
    if cfg.compile:
        # torch.compile splits the graph at DDP's buckets (DDPOptimizer) by one size, the largest cap,
        # and refuses one below its first bucket's (1 MiB): a small model's plan would stop the run.
        caps = [max(max(caps), _FIRST_BUCKET_BYTES / 2**20)]
    return {"bucket_cap_mb_list": caps} if _PER_BUCKET_CAPS else {"bucket_cap_mb": max(caps)}


def wrap(model: torch.nn.Module, env: DistEnv, cfg: ModelConfig, grad_accum: int, on_grads_ready=None):
    """Returns (the module to train, the plain module whose state_dict is checkpointed).
    Under DDP, `on_grads_ready()` is called when the backward pass has computed the first layer's
    gradients, the last ones it computes: from then on only the gradients' all_reduce is left (the
    per-rank time accounting)."""
    raw = model
    if env.initialized or env.world_size > 1:
        if cfg.sync_bn:
            raw = model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        has_buffers = any(True for _ in model.buffers())
        model = DDP(
            model,
            device_ids=[env.device.index] if env.device.type == "cuda" else None,
            gradient_as_bucket_view=True,  # grads live in the all-reduce buckets: no copy
            # the graph is the same every step, except under no_sync accumulation
            static_graph=grad_accum == 1,
            **bucket_args(model, env.device, cfg),
            **{_SYNC_BUFFERS: has_buffers},
        )  # BN stats from rank 0; nothing to send otherwise
        register_comm_hook(model, cfg)
        if on_grads_ready is not None:
            mark_grads_ready(raw, on_grads_ready)
    if cfg.compile:
        model = torch.compile(model)  # after DDP, so DDPOptimizer splits graphs at bucket boundaries
    return model, raw


def ddp_of(model: torch.nn.Module) -> DDP | None:
    """The DDP wrapper of a wrapped model, also inside torch.compile's OptimizedModule (so gradient
    accumulation can use its no_sync); None at world size 1."""
    model = getattr(model, "_orig_mod", model)
    return model if isinstance(model, DDP) else None


def mark_grads_ready(model: torch.nn.Module, callback) -> None:
    """Call `callback()` when the first trainable parameter gets its gradient. The backward pass runs
    in reverse, so the first layer's come last (the order DDP's buckets assume too). A
    post-accumulate-grad hook rather than a comm hook: DDP's all_reduce stays built in (a Python
    comm hook measured slower)."""
    first = next((p for p in model.parameters() if p.requires_grad), None)
    if first is not None:
        first.register_post_accumulate_grad_hook(lambda _: callback())


def register_comm_hook(ddp: DDP, cfg: ModelConfig) -> None:
    """The bucket's trip over the network. PowerSGD keeps per-rank state (error feedback, warm-start
    factors) that is not checkpointed: after a resume it starts over, with its vanilla all_reduce
    warm-up of --powersgd-warmup-steps steps."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    name = cfg.ddp_comm_hook
    if name == "none":
        return
    if name == "bf16":
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif name == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif name == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=cfg.powersgd_rank,
            # PowerSGD needs start_powerSGD_iter >= 2 with error feedback and warm start
            start_powerSGD_iter=max(2, cfg.powersgd_warmup_steps),
            random_seed=0,
        )
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    else:  # config validation lists the choices; a new one must be wired here
        raise ValueError(f"unknown DDP comm hook {name!r}")


def comm_hook_record(cfg: ModelConfig, world_size: int) -> dict:
    """What a checkpoint says about the comm hook (its name is also in the saved config)."""
    rec = {"name": cfg.ddp_comm_hook if world_size > 1 else "none"}
    if rec["name"] == "powersgd":
        rec["state"] = "not saved: PowerSGD restarts its warm-up and error feedback on resume"
    return rec


class StepVote:
    """The ranks' vote on one optimizer step (apply it or not, stop, checkpoint): the all-ranks max of
    a small flag vector, started before the backward pass and read after it, so no rank waits for it
    on the critical path: the collective is queued ahead of the gradients' all_reduce and has long
    finished when it is read.

    On CUDA the flags are also copied to pinned host memory on a side stream as soon as the collective
    is done, so reading them does not wait for the backward pass queued behind it on the compute
    stream; `on_device()` gives the reduced flags to the fused optimizer (found_inf) without any host
    synchronization."""

    _side_streams: dict = {}

    def __init__(self, flags: torch.Tensor):
        self.flags, self.event = flags, None
        self.work = (
            dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True)
            if dist.is_available() and dist.is_initialized()
            else None
        )
        if flags.is_cuda:
            side = self._side_streams.setdefault(flags.device, torch.cuda.Stream(flags.device))
            side.wait_stream(torch.cuda.current_stream(flags.device))
            flags.record_stream(side)
            with torch.cuda.stream(side):
                if self.work is not None:
                    self.work.wait()
                self.host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
                self.host.copy_(flags, non_blocking=True)
                self.event = torch.cuda.Event()
                self.event.record(side)

    def on_device(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()  # CUDA: the current stream waits; CPU: long done
        return self.flags

    def values(self) -> list[float]:
        if self.event is not None:
            self.event.synchronize()
            return self.host.tolist()
        return self.on_device().tolist()

    def read(self) -> list[bool]:
        return [v > 0 for v in self.values()]


class VoteCadence:
    """Which steps the ranks vote on. On CUDA every step: NCCL runs the vote's all_reduce on its own
    stream, ahead of the gradients', and the host reads it from pinned memory. On the CPU a vote is a
    round trip of gloo's threads every step, a few percent of a small model's step; there the ranks
    vote about every `seconds` -- a stop signal, rank 0's checkpoint clock or a failed write is acted on
    within about that long -- on every step that closes a log interval (it carries the ranks' time
    accounting) and on the last step, and a non-finite step is found without a vote (grads_nonfinite).
    Each vote carries every rank's mean step time since the last one; the next vote's step is planned
    from the slowest rank's, so every rank plans the same step without talking."""

    def __init__(self, every_step: bool, log_every: int, seconds: float = 0.5):
        self.every_step, self.log_every, self.seconds = every_step, log_every, seconds
        self.next_step, self._since, self._steps = None, None, 0

    def due(self, step: int, last_step: int) -> bool:
        """Whether step `step` (0-based) votes; the first step of a process always does."""
        return (
            self.every_step or self.next_step is None or step >= self.next_step or self.closes_interval(step, last_step)
        )

    def closes_interval(self, step: int, last_step: int) -> bool:
        """Whether step `step` (0-based) is the last of a log interval (or of the run)."""
        return (step + 1) % self.log_every == 0 or step + 1 == last_step

    def mean_step_seconds(self, now: float) -> float:
        """This rank's mean step time since the last vote (0 before the first: it plans one step)."""
        return (now - self._since) / self._steps if self._since is not None and self._steps else 0.0

    def voted(self, step: int, slowest_step_seconds: float, now: float) -> None:
        """After a vote at `step`: plan the next from the slowest rank's step time (the same on every rank)."""
        ahead = int(self.seconds / slowest_step_seconds) if slowest_step_seconds > 0 else 1
        self.next_step, self._since, self._steps = step + max(1, min(ahead, self.log_every)), now, 0

    def stepped(self) -> None:
        self._steps += 1


def poisoned(loss: torch.Tensor) -> torch.Tensor:
    """The loss, times NaN where it is not finite: the backward pass then makes this rank's gradients
    NaN, which survive DDP's averaging, so every rank's grads_nonfinite finds the same bad step. A
    finite loss is left as it is (on the CPU, where reading it costs no wait, no op joins the graph)
    or multiplied by exactly 1: its gradients are the same bits either way."""
    if loss.device.type == "cpu":
        return loss if math.isfinite(loss.item()) else loss * float("nan")
    return loss * torch.where(torch.isfinite(loss.detach()), 1.0, float("nan"))


def grads_nonfinite(params, total_norm: torch.Tensor | None = None) -> bool:
    """Whether the (reduced) gradients hold a NaN or Inf: the same answer on every rank, since DDP
    leaves every rank the same averaged gradients. `total_norm` is clipping's, when it has computed
    one (then an overflowing norm counts too). Otherwise GradScaler's own check, one pass over the
    gradients per device and dtype (its unscale by exactly 1 leaves them as they are)."""
    if total_norm is not None:
        return not bool(torch.isfinite(total_norm))
    groups: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            groups.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
    found = False
    for (device, _), grads in groups.items():
        found_inf, one = torch.zeros(1, device=device), torch.ones((), device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, one)
        found = found or bool(found_inf)
    return found
