"""Preflight checks, and what this process would do: `dist-cnn doctor`, `python train.py --dry-run`.

preflight(env) runs in distributed.setup() before the process group is joined, so that a launch
that cannot work is one line and exit code 2 instead of a hang, an oversubscribed node or a crash
deep inside torch.distributed:

* torchrun (or accelerate) started by srun with more than one task per node: every copy numbers
  its workers from local rank 0, so they share GPUs (and CPUs);
* torchrun asked for more processes on a node than it has GPUs (CUDA) or SLURM-allocated CPUs
  (CPU runs), e.g. slurm/train.sh with DIST_CNN_NPROC_PER_NODE above --ntasks-per-node;
* srun mode: rank 0 checks that MASTER_PORT is free on its host before it opens the store there.

Checked elsewhere: a batch script that forgot srun (distributed.detect: SLURM_NTASKS > 1 without
SLURM_STEP_ID, which SLURM sets in srun steps only), a local rank without its GPU
(distributed.pick_device), a head host that does not resolve (distributed.setup).

The doctor prints what was detected -- launcher, ranks, device, backend, head address, SLURM job,
CUDA, threads, run directory -- runs the same checks, and exits 0 (2 with a problem's line on
stderr) without joining a process group or training.
"""
from __future__ import annotations

import errno
import json
import os
import re
import socket
import sys

import torch

from . import config as config_mod, distributed as D
from .errors import UserError


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


def _int(environ, key: str) -> int | None:
    try:
        return int(environ[key])
    except (KeyError, ValueError):
        return None


def head_address(env: D.DistEnv, environ=os.environ) -> tuple[str, int]:
    """Where rank 0 hosts the store: in srun mode MASTER_ADDR/MASTER_PORT win (setup() only sets
    defaults), otherwise the first host of the job and the port derived from the job id."""
    if env.launcher == "slurm":
        return (environ.get("MASTER_ADDR") or env.master_addr,
                int(environ.get("MASTER_PORT") or env.master_port))
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
def problems(env: D.DistEnv, environ=os.environ) -> list[str]:
    """Every mismatch between the launch and the allocation that this process can see, one line each."""
    found = []
    cuda = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else 0
    in_step = "SLURM_STEP_ID" in environ
    local_world = _int(environ, "LOCAL_WORLD_SIZE")
    if env.launcher == "torchrun" and local_world:
        tasks = slurm_tasks_on_node(environ) if in_step else None
        if tasks and tasks > 1:
            found.append(f"srun started {tasks} tasks on this node and each runs torchrun (or accelerate launch) "
                         f"with {local_world} process(es): start one per node (srun --ntasks-per-node=1, as "
                         f"slurm/train.sh does), or let srun start train.py itself (DIST_CNN_LAUNCH=srun)")
        elif cuda and local_world > gpus:
            found.append(f"{local_world} processes on this node (torchrun --nproc_per_node; slurm/train.sh: "
                         f"DIST_CNN_NPROC_PER_NODE) but only {gpus} GPU(s) visible: start at most {gpus}, "
                         f"or ask SLURM for more GPUs (--gpus-per-node)")
        elif not cuda and local_world > (_int(environ, "SLURM_CPUS_ON_NODE") or local_world):
            cpus = _int(environ, "SLURM_CPUS_ON_NODE")
            found.append(f"{local_world} processes on this node (torchrun --nproc_per_node; slurm/train.sh: "
                         f"DIST_CNN_NPROC_PER_NODE) but SLURM allocated it {cpus} CPU(s) (SLURM_CPUS_ON_NODE): "
                         f"start at most {cpus}, or ask for more (--ntasks-per-node, --cpus-per-task)")
    if env.launcher == "slurm" and env.world_size > 1 and env.is_main:
        _, port = head_address(env, environ)
        if port_in_use(port):
            origin = "from the environment" if environ.get("MASTER_PORT") else "derived from SLURM_JOB_ID"
            found.append(f"MASTER_PORT {port} ({origin}) is already in use on {socket.gethostname()}, where rank 0 "
                         f"would host the process group (another job or process holds it): choose a free port "
                         f"with the environment variable MASTER_PORT (export MASTER_PORT=... before srun/sbatch)")
    return found


def preflight(env: D.DistEnv, environ=os.environ) -> None:
    """Called by distributed.setup() before init_process_group: the first problem as a UserError."""
    found = problems(env, environ)
    if found:
        raise UserError(found[0])


# ---- the report --------------------------------------------------------------------------------------
def launcher_name(env: D.DistEnv | None, environ=os.environ) -> str:
    if env is None:
        return "unknown (see the problem below)"
    if env.launcher in ("torchrun", "single") and any(k.startswith("ACCELERATE_") for k in environ):
        return "accelerate"
    return env.launcher


def threads_for(env: D.DistEnv, device: torch.device | None, environ=os.environ) -> int:
    """The intra-op threads the run would use (the rule of distributed.setup)."""
    if device is not None and device.type == "cpu" and "OMP_NUM_THREADS" not in environ:
        local_world = int(environ.get("LOCAL_WORLD_SIZE", 0) or 0) or env.world_size
        return max(1, (os.cpu_count() or 1) // local_world)
    return torch.get_num_threads()  # torch already read OMP_NUM_THREADS


def collect(cfg: config_mod.Config | None = None, environ=os.environ) -> dict:
    """What this process would do, and every problem found, without side effects."""
    cfg = cfg or config_mod.Config()
    found: list[str] = []
    try:
        env = D.detect(environ)
    except UserError as e:
        env = None
        found.append(str(e))
    info: dict = {"host": socket.gethostname(), "python": sys.version.split()[0], "torch": torch.__version__,
                  "launcher": launcher_name(env, environ)}
    cuda = torch.cuda.is_available()
    info["cuda"] = {"available": cuda, "gpus": torch.cuda.device_count() if cuda else 0,
                    "names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
                    "CUDA_VISIBLE_DEVICES": environ.get("CUDA_VISIBLE_DEVICES")}
    device = None
    if env is not None:
        info.update(rank=env.rank, world_size=env.world_size, local_rank=env.local_rank,
                    local_world_size=_int(environ, "LOCAL_WORLD_SIZE") or
                    (slurm_tasks_on_node(environ) if env.launcher == "slurm" else None) or env.world_size)
        try:
            device = D.pick_device(env)
        except UserError as e:
            found.append(str(e))
        info["device"] = str(device) if device is not None else None
        backend = "none"
        if env.world_size > 1:
            backend = cfg.dist.backend if cfg.dist.backend != "auto" else ("nccl" if cuda else "gloo")
            if backend == "nccl" and not cuda:
                found.append("--backend nccl needs CUDA GPUs; use gloo on the CPU")
        info["backend"] = backend
        if env.world_size > 1:
            host, port = head_address(env, environ)
            try:
                resolved = socket.getaddrinfo(host, None)[0][4][0]
            except socket.gaierror:
                resolved = None
                if env.launcher == "slurm":
                    found.append(f"head host {host!r} (first of SLURM_JOB_NODELIST) does not resolve")
            info["head"] = {"address": host, "port": port, "resolves_to": resolved}
        found += problems(env, environ)
        info["threads"] = threads_for(env, device, environ)
    info["cpus"] = {"os_cpu_count": os.cpu_count(),
                    "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                    "OMP_NUM_THREADS": environ.get("OMP_NUM_THREADS")}
    if "SLURM_JOB_ID" in environ:
        info["slurm"] = {
            "job_id": environ.get("SLURM_JOB_ID"), "job_name": environ.get("SLURM_JOB_NAME"),
            "nodelist": environ.get("SLURM_JOB_NODELIST"), "nodes": _int(environ, "SLURM_JOB_NUM_NODES"),
            "restart_count": int(environ.get("SLURM_RESTART_COUNT", "0") or 0),
            "step_id": environ.get("SLURM_STEP_ID"),  # None: the batch shell (not an srun step)
            "ntasks": _int(environ, "SLURM_NTASKS"), "procid": _int(environ, "SLURM_PROCID"),
            "tasks_on_node": slurm_tasks_on_node(environ), "cpus_on_node": _int(environ, "SLURM_CPUS_ON_NODE"),
            "gpus_on_node": environ.get("SLURM_GPUS_ON_NODE") or environ.get("SLURM_GPUS_PER_NODE"),
            "partition": environ.get("SLURM_JOB_PARTITION")}
    from .rundir import default_run_name, effective_resume
    info["run_dir"] = cfg.log.out or os.path.join("runs", default_run_name(cfg, environ))
    info["resume"] = effective_resume(cfg, environ)
    info["problems"] = list(dict.fromkeys(found))
    return info


def render(info: dict) -> str:
    rows = [("host", f"{info['host']} (python {info['python']}, torch {info['torch']})"),
            ("launcher", info["launcher"])]
    if "rank" in info:
        rows += [("rank", f"{info['rank']} of world size {info['world_size']}"),
                 ("local rank", f"{info['local_rank']} of {info['local_world_size']} on this node"),
                 ("device", info["device"]), ("backend", info["backend"])]
        if "head" in info:
            h = info["head"]
            rows.append(("head", f"{h['address']}:{h['port']} (resolves to {h['resolves_to'] or 'nothing'})"))
    c = info["cuda"]
    rows.append(("cuda", f"available, {c['gpus']} GPU(s): {', '.join(c['names'])}" if c["available"]
                 else "not available"))
    if c["CUDA_VISIBLE_DEVICES"] is not None:
        rows.append(("CUDA_VISIBLE_DEVICES", c["CUDA_VISIBLE_DEVICES"]))
    cpus = info["cpus"]
    rows.append(("threads", f"{info.get('threads', '?')} (OMP_NUM_THREADS={cpus['OMP_NUM_THREADS'] or 'unset'}, "
                            f"{cpus['affinity']} usable of {cpus['os_cpu_count']} CPUs)"))
    if "slurm" in info:
        s = info["slurm"]
        step = f"step {s['step_id']}" if s["step_id"] is not None else "batch shell (no srun step)"
        rows += [("slurm job", f"{s['job_id']} ({s['job_name']}), partition {s['partition']}, "
                               f"restart count {s['restart_count']}"),
                 ("slurm nodes", f"{s['nodelist']} ({s['nodes']} node(s)), {s['cpus_on_node']} CPU(s) and "
                                 f"{s['gpus_on_node'] or 0} GPU(s) on this node"),
                 ("slurm tasks", f"{step}, task {s['procid']} of {s['ntasks']}, {s['tasks_on_node']} on this node")]
    rows += [("run dir", info["run_dir"]), ("resume", info["resume"]),
             ("checks", "ok" if not info["problems"] else f"{len(info['problems'])} problem(s)")]
    rows += [("problem", p) for p in info["problems"]]
    prefix = f"[rank {info['rank']}] " if info.get("world_size", 1) > 1 else ""
    return "\n".join(f"{prefix}{k:<12} {v}" for k, v in rows)


def main_doctor(argv, prog: str = "dist-cnn doctor") -> int:
    """`dist-cnn doctor [train flags] [--json]` and `train.py --dry-run [flags]`: exit 0 when fine,
    2 (with the first problem as the one-line error) when the run would not start."""
    from .cli import train_parser
    parser = train_parser(prog)
    parser.description = ("Print what a training run started this way would do (launcher, ranks, device, "
                          "backend, head address, SLURM job, CUDA, threads) and check the launch against "
                          "the allocation, without training. Takes the training flags.")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ns = parser.parse_args(list(argv))
    info = collect(config_mod.from_args(ns))
    print(json.dumps(info) if ns.json else render(info), flush=True)
    if info["problems"]:
        raise UserError(info["problems"][0])
    return 0
