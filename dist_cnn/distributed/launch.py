"""Who launched this process, where the head of the group is, and whether the launch can work.

torchrun / `accelerate launch` set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
`srun python train.py` sets SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID: the head is the first host of
SLURM_JOB_NODELIST and the port is derived from the job id, so every task computes the same address.
Kubeflow's PyTorchJob (training-operator v1) started without torchrun, one process per pod: RANK
is the pod's index and WORLD_SIZE the number of pods, with MASTER_ADDR/MASTER_PORT the master pod;
read as such only inside a Kubernetes pod (KUBERNETES_SERVICE_HOST) when nothing torchrun sets for
its workers (LOCAL_RANK, LOCAL_WORLD_SIZE) is there. Under torchrun, torchrun's own variables win.
Nothing set: one process and no process group. The library never spawns processes itself.

The launch checks (`problems`, `preflight`) run before the process group is joined, so that a launch
that cannot work is one line and exit code 2 instead of a hang, an oversubscribed node or a crash
deep inside torch.distributed:

* torchrun (or accelerate) started by srun with more than one task per node: every copy numbers
  its workers from local rank 0, so they share GPUs (and CPUs);
* torchrun asked for more processes on a node than it has GPUs (CUDA) or SLURM-allocated CPUs
  (CPU runs), e.g. slurm/train.sh with DIST_CNN_NPROC_PER_NODE above --ntasks-per-node;
* srun mode: rank 0 checks that MASTER_PORT is free on its host before it opens the store there;
* a batch script that forgot srun (SLURM_NTASKS > 1 without SLURM_STEP_ID, which SLURM sets in srun
  steps only), a local rank without its GPU, a head host that does not resolve.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dist_cnn.errors import UserError


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "single"  # single | torchrun | slurm | kubeflow | existing (a process group made before us)
    backend: str = "none"
    master_addr: str = ""
    master_port: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # this process made the group (and destroys it at the end)

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        """In a process group: world size > 1, or a group of one (process_group.GROUP_OF_ONE)."""
        return dist.is_available() and dist.is_initialized()


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist ('node[03-05,7],gpu1' -> 'node03'); scontrol when available."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=10)
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


def _env_int(environ, name: str, lo: int, hi: int | None = None, default: int | None = None) -> int:
    """An integer launch variable, or a one-line error naming it (a half-set or contradictory launch
    environment must not start a run that hangs in the rendezvous)."""
    raw = environ.get(name)
    if raw is None or raw == "":
        if default is None:
            raise UserError(
                f"launch environment: {name} is not set (set by torchrun/srun; unset RANK and "
                "WORLD_SIZE to run one process)"
            )
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"launch environment: {name}={raw!r} is not an integer") from None
    if value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise UserError(f"launch environment: {name}={value} must be {bound}")
    return value


def detect(environ=os.environ) -> DistEnv:
    """Who launched us and where the head is; pure reading, no side effects. A contradictory launch
    environment is a one-line error."""
    if one_process_per_pod(environ):
        world = _env_int(environ, "WORLD_SIZE", 1)
        return DistEnv(
            rank=_env_int(environ, "RANK", 0, world - 1),
            world_size=world,
            launcher="kubeflow",
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_env_int(environ, "MASTER_PORT", 1, 65535, default=29500),
        )
    if "RANK" in environ or "WORLD_SIZE" in environ:
        world = _env_int(environ, "WORLD_SIZE", 1)
        rank = _env_int(environ, "RANK", 0, world - 1)
        local_world = _env_int(environ, "LOCAL_WORLD_SIZE", 1, world, default=world)
        local_rank = _env_int(environ, "LOCAL_RANK", 0, local_world - 1, default=0 if world == 1 else None)
        if local_rank > rank:
            raise UserError(f"launch environment: LOCAL_RANK={local_rank} cannot exceed RANK={rank}")
        return DistEnv(
            rank=rank,
            world_size=world,
            local_rank=local_rank,
            launcher="torchrun",
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_env_int(environ, "MASTER_PORT", 1, 65535, default=29500),
        )
    if "SLURM_PROCID" in environ and _env_int(environ, "SLURM_NTASKS", 1, default=1) > 1:
        if "SLURM_STEP_ID" not in environ:
            raise UserError(
                "SLURM_NTASKS > 1 but this is the batch shell, not a job step: "
                "start train.py with srun (see slurm/train.sh)"
            )
        world = _env_int(environ, "SLURM_NTASKS", 1)
        return DistEnv(
            rank=_env_int(environ, "SLURM_PROCID", 0, world - 1),
            world_size=world,
            local_rank=_env_int(environ, "SLURM_LOCALID", 0, world - 1, default=0),
            launcher="slurm",
            master_addr=first_slurm_host(environ["SLURM_JOB_NODELIST"]),
            master_port=slurm_port(environ.get("SLURM_JOB_ID", "0")),
        )
    return DistEnv()


def one_process_per_pod(environ=os.environ) -> bool:
    """A Kubeflow PyTorchJob pod whose command is train.py itself: RANK and WORLD_SIZE count pods."""
    return (
        "KUBERNETES_SERVICE_HOST" in environ
        and "RANK" in environ
        and "WORLD_SIZE" in environ
        and not any(k in environ for k in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"))
    )


def pick_device(env: DistEnv, environ=os.environ) -> torch.device:
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        if n == 1:  # per-task GPU binding (srun --gpus-per-task=1): each task sees only its own GPU
            shared = shared_gpu(env, environ)
            if shared:
                raise UserError(shared)
            return torch.device("cuda", 0)
        if env.local_rank >= n:
            raise UserError(
                f"local rank {env.local_rank} but only {n} GPU(s) on this node: start fewer processes per node"
            )
        return torch.device("cuda", env.local_rank)
    return torch.device("cpu")


def shared_gpu(env: DistEnv, environ=os.environ) -> str | None:
    """One line when this task sees one GPU but SLURM gave this node's tasks fewer GPUs than tasks: every
    rank would then pick cuda:0 (torchrun's ranks are checked by local rank instead). Per-task binding
    (--gpus-per-task=1) gives the node as many GPUs as tasks; with no GPU variables from SLURM nothing
    binds tasks to GPUs, so all of them see the same one."""
    if env.launcher != "slurm":
        return None
    tasks = slurm_tasks_on_node(environ) or 1
    if tasks <= 1:
        return None
    gpus = slurm_gpus_on_node(environ)
    if gpus is not None and gpus >= tasks:
        return None
    return (
        f"{tasks} tasks on this node but {gpus or 1} GPU(s) for them: every rank would use cuda:0; "
        f"give each task its own GPU (srun --gpus-per-task=1) or start at most {gpus or 1} task(s) per node"
    )


def slurm_gpus_on_node(environ=os.environ) -> int | None:
    """GPUs SLURM allocated to this step (or job) on this node; None when SLURM manages no GPUs."""
    count = env_int(environ, "SLURM_GPUS_ON_NODE")
    if count is not None:
        return count
    for key in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS"):  # GPU ids, as on older SLURM releases
        ids = [g for g in environ.get(key, "").split(",") if g.strip()]
        if ids:
            return len(ids)
    return None


# ---- SLURM environment ---------------------------------------------------------------------------
def expand_counts(spec: str) -> list[int]:
    """A SLURM per-node count list: '2(x3),1' -> [2, 2, 2, 1]; unparsable or empty -> []."""
    out: list[int] = []
    for part in filter(None, (spec or "").split(",")):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            return []
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def slurm_tasks_on_node(environ=os.environ) -> int | None:
    """Tasks of this srun step (or job, in the batch shell) on this node; None outside SLURM."""
    counts = expand_counts(environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE", ""))
    if not counts:
        return None
    i = int(environ.get("SLURM_NODEID", "0") or 0)
    return counts[i] if i < len(counts) else counts[0]


def env_int(environ, key: str) -> int | None:
    try:
        return int(environ[key])
    except (KeyError, ValueError):
        return None


def head_address(env: DistEnv, environ=os.environ) -> tuple[str, int]:
    """Where rank 0 hosts the store: in srun mode MASTER_ADDR/MASTER_PORT win (setup() only sets
    defaults), otherwise the first host of the job and the port derived from the job id."""
    if env.launcher == "slurm":
        return (environ.get("MASTER_ADDR") or env.master_addr, int(environ.get("MASTER_PORT") or env.master_port))
    return env.master_addr, env.master_port


def port_in_use(port: int) -> bool:
    """True when something already listens on `port` on this host (a bind test, as the store's
    own listening socket: SO_REUSEADDR, so connections of an earlier run in TIME_WAIT -- a requeued
    job gets the same port -- do not count)."""
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 here
        with s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((addr, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return True
    return False


# ---- checks ----------------------------------------------------------------------------------------
def problems(env: DistEnv, environ=os.environ) -> list[str]:
    """Every mismatch between the launch and the allocation that this process can see, one line each."""
    found = []
    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    in_step = "SLURM_STEP_ID" in environ
    local_world = env_int(environ, "LOCAL_WORLD_SIZE")
    if env.launcher == "torchrun" and local_world:
        tasks = slurm_tasks_on_node(environ) if in_step else None
        if tasks and tasks > 1:
            found.append(
                f"srun started {tasks} tasks on this node and each runs torchrun (or accelerate launch) "
                f"with {local_world} process(es): start one per node (srun --ntasks-per-node=1, as "
                f"slurm/train.sh does), or let srun start train.py itself (DIST_CNN_LAUNCH=srun)"
            )
        elif cuda and local_world > gpus:
            found.append(
                f"{local_world} processes on this node (torchrun --nproc_per_node; slurm/train.sh: "
                f"DIST_CNN_NPROC_PER_NODE) but only {gpus} GPU(s) visible: start at most {gpus}, "
                f"or ask SLURM for more GPUs (--gpus-per-node)"
            )
        elif not cuda and local_world > (env_int(environ, "SLURM_CPUS_ON_NODE") or local_world):
            cpus = env_int(environ, "SLURM_CPUS_ON_NODE")
            found.append(
                f"{local_world} processes on this node (torchrun --nproc_per_node; slurm/train.sh: "
                f"DIST_CNN_NPROC_PER_NODE) but SLURM allocated it {cpus} CPU(s) (SLURM_CPUS_ON_NODE): "
                f"start at most {cpus}, or ask for more (--ntasks-per-node, --cpus-per-task)"
            )
    if env.launcher == "slurm" and env.world_size > 1 and env.is_rank0:
        _, port = head_address(env, environ)
        if port_in_use(port):
            origin = "from the environment" if environ.get("MASTER_PORT") else "derived from SLURM_JOB_ID"
            found.append(
                f"MASTER_PORT {port} ({origin}) is already in use on {socket.gethostname()}, where rank 0 "
                f"would host the process group (another job or process holds it): choose a free port "
                f"with the environment variable MASTER_PORT (export MASTER_PORT=... before srun/sbatch)"
            )
    return found


def preflight(env: DistEnv, environ=os.environ) -> None:
    """Called before init_process_group: the first problem as a UserError."""
    found = problems(env, environ)
    if found:
        raise UserError(found[0])


def resolve_backend(requested: str, device: torch.device) -> str:
    """The process group backend for this device: nccl on CUDA, gloo on the CPU, unless requested."""
    backend = ("nccl" if device.type == "cuda" else "gloo") if requested == "auto" else requested
    if backend == "nccl" and device.type != "cuda":
        raise UserError("--backend nccl needs CUDA GPUs; use gloo on the CPU")
    return backend


def threads_for(env: DistEnv, device: torch.device | None, environ=os.environ) -> int:
    """Intra-op threads for this process: the node's cores shared by its processes on the CPU
    (oversubscribed OpenMP threads spin and run many times slower); OMP_NUM_THREADS wins when set."""
    if device is not None and device.type == "cpu" and "OMP_NUM_THREADS" not in environ:
        local_world = int(environ.get("LOCAL_WORLD_SIZE", 0) or 0) or (
            1 if env.launcher == "kubeflow" else env.world_size
        )
        return max(1, (os.cpu_count() or 1) // local_world)
    return torch.get_num_threads()  # torch already read OMP_NUM_THREADS


def resolve_head(host: str) -> str | None:
    """The address the head host name resolves to, or None."""
    try:
        return socket.getaddrinfo(host, None)[0][4][0]
    except (socket.gaierror, UnicodeError):
        return None
