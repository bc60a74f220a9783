"""The step's agreement flags carried inside the last gradient bucket's all_reduce (a DDP comm hook).

Every step the ranks must agree on a few flags (non-finite loss, stop, checkpoint due, write failed,
and at the end of a log interval every rank's time accounting). parallel.Agreement sends them in a
collective of their own; on gloo every collective is a round trip through the same worker threads
as the gradients', so here the flags ride along with the gradients instead: the last bucket (the
first layers, ready when the backward pass ends) is sent as [its gradients, the flags] in one
all_reduce (sum). A flag is set when the sum is above zero, which is the max's answer for flags of 0
and 1; the accounting slots are zero except on their own rank, so their sum is every rank's figures.

Used on the CPU (gloo) with no other comm hook and no torch.compile; elsewhere the flags keep their
own collective (on CUDA it runs on its own stream and is read from pinned memory without a sync).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class BucketFlags:
    """The comm hook's state: the flags to send with this step's last bucket, and what came back."""

    def __init__(self, world_size: int):
        self.world = world_size
        self.active = False  # set by parallel.wrap when the hook is registered
        self.outgoing: torch.Tensor | None = None
        self.result: torch.Tensor | None = None

    def carry(self, flags: torch.Tensor) -> CarriedAgreement:
        """Send `flags` with the next backward pass's last bucket (before that backward pass starts)."""
        self.outgoing, self.result = flags, None
        return CarriedAgreement(self)


class CarriedAgreement:
    """parallel.Agreement's interface over the flags that came back with the gradients."""

    def __init__(self, state: BucketFlags):
        self.state = state

    def on_device(self) -> torch.Tensor:
        s = self.state
        if s.result is None:
            # DDP's first step with static_graph reduces the buckets without the comm hook, on every
            # rank alike: the flags then take a collective of their own
            if s.outgoing is None:
                raise RuntimeError("the step's flags were neither sent nor carried")
            s.result, s.outgoing = s.outgoing, None
            dist.all_reduce(s.result, op=dist.ReduceOp.MAX)
        return s.result

    def values(self) -> list[float]:
        return self.on_device().tolist()

    def read(self) -> list[bool]:
        return [v > 0 for v in self.values()]


def allreduce_carrying_flags(state, bucket):
    """DDP's default all_reduce (mean), the last bucket with the step's flags appended. (No annotations:
    DDP compares them with dist.GradBucket, and this module's are strings.)"""
    buf = bucket.buffer()
    flags = state.outgoing
    if not bucket.is_last() or flags is None:
        fut = dist.all_reduce(buf.div_(state.world), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])
    state.outgoing = None
    n = buf.numel()
    packed = torch.cat([buf.div_(state.world), flags.to(buf.dtype)])
    fut = dist.all_reduce(packed, async_op=True).get_future()

    def split(f) -> torch.Tensor:
        out = f.value()[0]
        state.result = out[n:].float()
        return buf.copy_(out[:n])

    return fut.then(split)
