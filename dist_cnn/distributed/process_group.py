"""The process group: joining and leaving it, and the few collectives the trainer uses.

Who launched us, where the head is and whether the launch can work is `launch.py`'s business; this
module acts on its answer. Every rank calls the same functions in the same order.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re

import torch
import torch.distributed as dist

from dist_cnn.distributed.launch import (
    DistEnv,
    detect,
    pick_device,
    preflight,
    resolve_backend,
    resolve_head,
    threads_for,
)
from dist_cnn.errors import PeerError, UserError
from dist_cnn.observability.hang import flight_recorder_env

JOINED_GROUP = False  # this process was part of a process group (see commands.entry)


def setup(backend: str = "auto", timeout_s: float = 300.0, environ=os.environ) -> DistEnv:
    """Detect, check the launch, pick the device, and join the process group (world size > 1 only)."""
    env = detect(environ)
    preflight(env, environ)
    env.device = pick_device(env)
    if env.device.type == "cpu":
        torch.set_num_threads(threads_for(env, env.device, environ))
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if env.world_size == 1:
        return env
    env.backend = resolve_backend(backend, env.device)
    if env.backend == "nccl":  # before the group exists: the hang report's flight recorder
        flight_recorder_env(environ)
    if env.launcher == "slurm":
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        if resolve_head(env.master_addr) is None:
            raise UserError(f"head host {env.master_addr!r} (first of SLURM_JOB_NODELIST) does not resolve")
    elif resolve_head(env.master_addr) is None:  # a hand-made launch environment: one line, not a hang
        raise UserError(f"launch environment: MASTER_ADDR={env.master_addr!r} does not resolve")
    global JOINED_GROUP
    JOINED_GROUP = True
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(
        env.backend,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
        store=_agent_store(env, timeout, environ),
        device_id=env.device if env.device.type == "cuda" else None,
    )
    return env


@contextlib.contextmanager
def process_group(backend: str = "auto", timeout_s: float = 300.0):
    """setup() ... teardown(): after success all ranks leave together, after an error at once."""
    env = setup(backend, timeout_s)
    try:
        yield env
    except BaseException:
        teardown(graceful=False)
        raise
    teardown()


def _agent_store(env: DistEnv, timeout, environ):
    """torchrun's store, with a key prefix per restart attempt.

    torchrun keeps one store across elastic restarts, so without a prefix the restarted group reads
    the dead group's keys (gloo then dials the old ranks' addresses and hangs or is refused).
    """
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # env:// as usual: rank 0 hosts the store at MASTER_ADDR:MASTER_PORT
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"dist_cnn/attempt_{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def store():
    """The process group's key-value store (None for a single process)."""
    return dist.distributed_c10d._get_default_store() if dist.is_available() and dist.is_initialized() else None


def teardown(graceful: bool = True) -> None:
    """Leave the group; after success all ranks leave together (a rank that tore down while a peer
    was still sending has aborted in gloo's destructor), after an error without waiting."""
    if dist.is_available() and dist.is_initialized():
        if graceful:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# What a collective raises when another rank went away: gloo's transport errors (a peer killed or
# crashed: connection reset/closed; a peer hung or unreachable: timed out), torch's store and network
# errors, NCCL's backend errors.
_COMM_FAILURE = re.compile(r"gloo/transport|Connection (reset|closed) by peer|Timed out waiting \S+ for (recv|send)")


def comm_failure(exc: BaseException) -> str | None:
    """One line for a collective that failed because a peer process or node was lost; None otherwise."""
    lost = isinstance(exc, (dist.DistNetworkError, dist.DistStoreError, dist.DistBackendError))
    text = str(exc)
    if not lost and not (isinstance(exc, RuntimeError) and _COMM_FAILURE.search(text)):
        return None
    # "[.../pair.cc:545] Read error [10.0.0.2]:45769: Connection reset by peer. This is typically ..."
    detail = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text.strip().splitlines()[0] if text.strip() else "")
    detail = detail.split(". This is typically")[0].rstrip(". ")
    return (
        f"lost contact with another process of the job ({detail or type(exc).__name__}): a rank or node "
        f"died, hung or became unreachable; its own log says why. Checkpoints written so far are kept"
    )


def main_only(env: DistEnv, fn):
    """fn on rank 0 only; its result, or its UserError, reaches every rank."""
    result, err = None, None
    if env.is_main:
        try:
            result = fn()
        except UserError as e:
            err = e
    err = broadcast_object(None if err is None else str(err), env)
    if err:
        raise UserError(err) if env.is_main else PeerError(err)
    return broadcast_object(result, env)


def main_then_all(env: DistEnv, fn):
    """fn on rank 0 first (to fill a cache or download once), then on the others."""
    result = None

    def first():
        nonlocal result
        result = fn()

    main_only(env, first)
    return result if env.is_main else fn()


def broadcast_object(obj, env: DistEnv):
    """Rank 0's object on every rank."""
    if not env.initialized:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
