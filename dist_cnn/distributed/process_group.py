"""The process group: joining and leaving it, and the few collectives the trainer uses.

Who launched us, where the head is and whether the launch can work is `launch.py`'s business; this
module acts on its answer. Every rank calls the same functions in the same order.

Two bounds: the group's own timeout (--timeout) bounds the collectives of training; rank 0's one-time
setup (rank0_only, rank0_then_all: preparing the run directory, listing ImageNet, decoding a folder into
memory) can take far longer, so the other ranks wait for it on a second, gloo group whose timeout is
--setup-timeout. That group carries only small pickled objects (no device copies under NCCL).

NCCL: TORCH_NCCL_ASYNC_ERROR_HANDLING is 2 (abort the communicators, leave the process alone) unless
the environment sets it. torch's default tears the process down from NCCL's watchdog thread when a
collective times out, before the failed wait reaches Python; with 2 the wait raises a DistBackendError
and the job ends with the same one line as under gloo ("lost contact with another process ...").

A process group that already exists when training starts (a notebook, Lightning, Ray Train, a
user's own launcher called init_process_group) is used as it is -- its backend, rank and world
size -- and left in place at the end: whoever made it destroys it.
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
    env_int,
    pick_device,
    preflight,
    resolve_backend,
    resolve_head,
    threads_for,
)
from dist_cnn.errors import PeerError, UserError

JOINED_GROUP = False  # this process was part of a process group (see commands.entry)
_GROUPS_MADE = 0  # groups this process made on torchrun's store so far (every rank counts alike)


NCCL_ERROR_HANDLING = "2"  # TORCH_NCCL_ASYNC_ERROR_HANDLING: abort communicators only (module docstring)
_SETUP_GROUP = None  # the gloo group rank 0's setup is waited for on (--setup-timeout)
# A single process joins no group, unless this is 1: then it makes a group of one and runs every
# distributed code path (DDP, the step agreement, object collectives, teardown) on one device; the GPU
# check uses it to run dist_cnn's own NCCL code on a machine with one GPU.
GROUP_OF_ONE = "DIST_CNN_GROUP_OF_ONE"


def nccl_error_handling(environ=os.environ) -> str:
    """Set NCCL's async error handling before the group is made (the user's own setting wins)."""
    return environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", NCCL_ERROR_HANDLING)


def setup(
    backend: str = "auto", timeout_s: float = 300.0, environ=os.environ, setup_timeout_s: float = 3600.0
) -> DistEnv:
    """Detect, check the launch, pick the device, and join the process group (world size > 1, or a group
    of one with DIST_CNN_GROUP_OF_ONE=1); inside an existing process group, that group."""
    if dist.is_available() and dist.is_initialized():
        return existing(environ)
    env = detect(environ)
    preflight(env, environ)
    env.device = pick_device(env, environ)
    if env.device.type == "cpu":
        torch.set_num_threads(threads_for(env, env.device, environ))
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    group_of_one = env.world_size == 1 and environ.get(GROUP_OF_ONE) == "1"
    if env.world_size == 1 and not group_of_one:
        return env
    env.backend = resolve_backend(backend, env.device)
    if env.backend == "nccl":  # before the group exists: the hang report's flight recorder
        _flight_recorder_env(environ)
    if group_of_one:
        pass  # an in-process store: nobody else to meet
    elif env.launcher == "slurm":
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        if resolve_head(env.master_addr) is None:
            raise UserError(f"head host {env.master_addr!r} (first of SLURM_JOB_NODELIST) does not resolve")
    elif resolve_head(env.master_addr) is None:  # a hand-made launch environment: one line, not a hang
        raise UserError(f"launch environment: MASTER_ADDR={env.master_addr!r} does not resolve")
    global JOINED_GROUP
    JOINED_GROUP = True
    if env.backend == "nccl":
        nccl_error_handling(os.environ)  # torch reads it from the process environment
    env.owns_group = True
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(
        env.backend,
        rank=env.rank,
        world_size=env.world_size,
        timeout=timeout,
        store=dist.HashStore() if group_of_one else _agent_store(env, timeout, environ),
        device_id=env.device if env.device.type == "cuda" else None,
    )
    make_setup_group(setup_timeout_s)
    return env


def make_setup_group(setup_timeout_s: float) -> None:
    """The gloo group rank0_only and rank0_then_all wait on (every rank calls this once, after joining)."""
    global _SETUP_GROUP
    _SETUP_GROUP = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=setup_timeout_s))


def existing(environ=os.environ) -> DistEnv:
    """The DistEnv of the process group someone else made: its rank, world size and backend; the
    GPU the caller selected for NCCL (torch.cuda.current_device()), the CPU for gloo."""
    world, rank = dist.get_world_size(), dist.get_rank()
    backend = str(dist.get_backend())
    local_rank = env_int(environ, "LOCAL_RANK")
    env = DistEnv(
        rank=rank,
        world_size=world,
        local_rank=local_rank if local_rank is not None and 0 <= local_rank <= rank else rank,
        launcher="existing",
        backend=backend,
        master_addr=environ.get("MASTER_ADDR", ""),
        master_port=env_int(environ, "MASTER_PORT") or 0,
    )
    env.device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
    if env.device.type == "cpu":
        torch.set_num_threads(threads_for(env, env.device, environ))
    return env


@contextlib.contextmanager
def process_group(backend: str = "auto", timeout_s: float = 300.0, setup_timeout_s: float = 3600.0):
    """setup() ... teardown(): after success all ranks leave together, after an error at once. A group
    that existed before is left as it was."""
    env = setup(backend, timeout_s, setup_timeout_s=setup_timeout_s)
    if not env.owns_group:
        yield env
        return
    try:
        yield env
    except BaseException:
        teardown(graceful=False)
        raise
    teardown()


def _agent_store(env: DistEnv, timeout, environ):
    """torchrun's store, with a key prefix per restart attempt.

    torchrun keeps one store across elastic restarts, so without a prefix the restarted group reads
    the dead group's keys (gloo then dials the old ranks' addresses and hangs or is refused); the
    same holds for a second group made in the same process.
    """
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # env:// as usual: rank 0 hosts the store at MASTER_ADDR:MASTER_PORT
    global _GROUPS_MADE
    _GROUPS_MADE += 1  # a second run in the same process (two fit() calls) must not read the first's keys
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False, timeout=timeout)
    attempt = environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"dist_cnn/attempt_{attempt}/group_{_GROUPS_MADE}", store)


def _flight_recorder_env(environ=os.environ) -> None:
    """NCCL's flight recorder, set before the NCCL process group is created (no effect on gloo): a
    ring of each rank's last 2000 collectives, dumped by torch's watchdog on a timeout."""
    environ.setdefault("TORCH_NCCL_TRACE_BUFFER_SIZE", "2000")
    environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "1")


def store():
    """The process group's key-value store (None for a single process)."""
    return dist.distributed_c10d._get_default_store() if dist.is_available() and dist.is_initialized() else None


def teardown(graceful: bool = True) -> None:
    """Leave the group; after success all ranks leave together (a rank that tore down while a peer
    was still sending has aborted in gloo's destructor), after an error without waiting."""
    global _SETUP_GROUP
    if dist.is_available() and dist.is_initialized():
        if graceful:
            dist.barrier()
        dist.destroy_process_group()
    _SETUP_GROUP = None


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# What a collective raises when another rank went away: gloo's transport errors (a peer killed or
# crashed: connection reset/closed; a peer hung or unreachable: timed out), torch's store and network
# errors, NCCL's backend errors (a timed-out collective whose communicator the watchdog aborted).
_COMM_FAILURE = re.compile(
    r"gloo/transport|Connection (reset|closed) by peer|Timed out waiting \S+ for (recv|send)"
    r"|Watchdog caught collective operation timeout|NCCL communicator was aborted"
)


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


def rank0_only(env: DistEnv, fn):
    """fn on rank 0 only; its result, or its UserError, reaches every rank. The others wait up to
    --setup-timeout (the setup group), not --timeout."""
    result, err = None, None
    if env.is_rank0:
        try:
            result = fn()
        except UserError as e:
            err = e
    err = broadcast_object(None if err is None else str(err), env, group=_SETUP_GROUP)
    if err:
        raise UserError(err) if env.is_rank0 else PeerError(err)
    return broadcast_object(result, env, group=_SETUP_GROUP)


def rank0_then_all(env: DistEnv, fn):
    """fn on rank 0 first (to fill a cache or download once), then on the others."""
    result = None

    def first():
        nonlocal result
        result = fn()

    rank0_only(env, first)
    if not env.is_rank0:
        result = fn()
    if env.initialized:  # nobody starts the next collective (--timeout) while another still loads
        dist.barrier(group=_SETUP_GROUP)
    return result


def broadcast_object(obj, env: DistEnv, group=None):
    """Rank 0's object on every rank (over `group`, the default group when None)."""
    if not env.initialized:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]
