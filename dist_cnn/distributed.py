"""The process group, read from the environment that launched us.

torchrun / `accelerate launch` set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
`srun python train.py` sets SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID: the head is the first host of
SLURM_JOB_NODELIST and the port is derived from the job id, so every task computes the same address.
Nothing set: one process and no process group. The library never spawns processes itself.
"""
from __future__ import annotations

import datetime
import os
import re
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError


JOINED_GROUP = False  # this process was part of a process group (see cli.entry)


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "single"      # single | torchrun | slurm
    backend: str = "none"
    master_addr: str = ""
    master_port: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return self.world_size > 1 and dist.is_initialized()


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist ('node[03-05,7],gpu1' -> 'node03'); scontrol when available."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    m = re.match(r"([^,\[]+)(?:\[([^\],-]+))?", nodelist)
    if not m:
        raise UserError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    return m.group(1) + (m.group(2) or "")


def slurm_port(job_id: str) -> int:
    # Deterministic per job so every task agrees without talking; spread over an unprivileged range.
    return 20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000


def detect(environ=os.environ) -> DistEnv:
    """Who launched us and where the head is; pure reading, no side effects."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return DistEnv(rank=int(environ["RANK"]), world_size=int(environ["WORLD_SIZE"]),
                       local_rank=int(environ.get("LOCAL_RANK", 0)), launcher="torchrun",
                       master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
                       master_port=int(environ.get("MASTER_PORT", 29500)))
    if "SLURM_PROCID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
        if "SLURM_STEP_ID" not in environ:
            raise UserError("SLURM_NTASKS > 1 but this is the batch shell, not a job step: "
                            "start train.py with srun (see slurm/train.sh)")
        return DistEnv(rank=int(environ["SLURM_PROCID"]), world_size=int(environ["SLURM_NTASKS"]),
                       local_rank=int(environ.get("SLURM_LOCALID", 0)), launcher="slurm",
                       master_addr=first_slurm_host(environ["SLURM_JOB_NODELIST"]),
                       master_port=slurm_port(environ.get("SLURM_JOB_ID", "0")))
    return DistEnv()


def pick_device(env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        if n == 1:  # per-task GPU binding (srun --gpus-per-task=1): each task sees only its own GPU
            return torch.device("cuda", 0)
        if env.local_rank >= n:
            raise UserError(f"local rank {env.local_rank} but only {n} GPU(s) on this node: "
                            "start fewer processes per node")
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def setup(backend: str = "auto", timeout_s: float = 300.0, environ=os.environ) -> DistEnv:
    """Detect, pick the device, and join the process group (world size > 1 only)."""
    env = detect(environ)
    from .doctor import preflight  # launch vs allocation checks (dist_cnn/doctor.py); one-line UserErrors
    preflight(env, environ)
    env.device = pick_device(env)
    if env.device.type == "cpu" and "OMP_NUM_THREADS" not in environ:
        # Ranks sharing a node's cores: oversubscribed OpenMP threads spin and run ~10x slower.
        local_world = int(environ.get("LOCAL_WORLD_SIZE", 0)) or env.world_size
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if env.world_size == 1:
        return env
    env.backend = ("nccl" if env.device.type == "cuda" else "gloo") if backend == "auto" else backend
    if env.backend == "nccl" and env.device.type != "cuda":
        raise UserError("--backend nccl needs CUDA GPUs; use gloo on the CPU")
    if env.launcher == "slurm":
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        try:
            socket.getaddrinfo(env.master_addr, None)
        except socket.gaierror:
            raise UserError(f"head host {env.master_addr!r} (first of SLURM_JOB_NODELIST) does not resolve") from None
    global JOINED_GROUP
    JOINED_GROUP = True
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(env.backend, rank=env.rank, world_size=env.world_size, timeout=timeout,
                            store=_agent_store(env, timeout, environ),
                            device_id=env.device if env.device.type == "cuda" else None)
    return env


def _agent_store(env: DistEnv, timeout, environ):
    """torchrun's store, with a key prefix per restart attempt.

    torchrun keeps one store across elastic restarts, so without a prefix the restarted group reads
    the dead group's keys (gloo then dials the old ranks' addresses and hangs or is refused).
    """
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # env:// as usual: rank 0 hosts the store at MASTER_ADDR:MASTER_PORT
    store = dist.TCPStore(env.master_addr, env.master_port, env.world_size, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"dist_cnn/attempt_{environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


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


def barrier(env: DistEnv) -> None:
    if env.initialized:
        dist.barrier()


class PeerError(UserError):
    """Rank 0's error, re-raised on the other ranks: rank 0 already reported it."""


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
