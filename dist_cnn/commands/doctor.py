"""`dist-cnn doctor` and `python train.py --dry-run`: what this process would do, and whether it can.

The doctor prints what was detected -- launcher, ranks, device, backend, head address, SLURM job,
CUDA, threads, run directory -- runs the same checks, and exits 0 (2 with a problem's line on
stderr) without joining a process group or training.
"""

from __future__ import annotations

import json
import os
import socket
import sys

import torch

from dist_cnn import config as config_mod
from dist_cnn.distributed import launch
from dist_cnn.distributed.launch import (
    DistEnv,
    env_int,
    head_address,
    problems,
    resolve_backend,
    resolve_head,
    slurm_tasks_on_node,
    threads_for,
)
from dist_cnn.errors import UserError
from dist_cnn.train.rundir import default_run_name, effective_resume


def launcher_name(env: DistEnv | None, environ=os.environ) -> str:
    if env is None:
        return "unknown (see the problem below)"
    if env.launcher in ("torchrun", "single") and any(k.startswith("ACCELERATE_") for k in environ):
        return "accelerate"
    return env.launcher


def collect(cfg: config_mod.Config | None = None, environ=os.environ) -> dict:
    """What this process would do, and every problem found, without side effects."""
    cfg = cfg or config_mod.Config()
    found: list[str] = []
    try:
        env = launch.detect(environ)
    except UserError as e:
        env = None
        found.append(str(e))
    info: dict = {
        "host": socket.gethostname(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "launcher": launcher_name(env, environ),
    }
    cuda = torch.cuda.is_available()
    info["cuda"] = {
        "available": cuda,
        "gpus": torch.cuda.device_count() if cuda else 0,
        "names": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "CUDA_VISIBLE_DEVICES": environ.get("CUDA_VISIBLE_DEVICES"),
    }
    device = None
    if env is not None:
        info.update(
            rank=env.rank,
            world_size=env.world_size,
            local_rank=env.local_rank,
            local_world_size=env_int(environ, "LOCAL_WORLD_SIZE")
            or (slurm_tasks_on_node(environ) if env.launcher == "slurm" else None)
            or env.world_size,
        )
        try:
            device = launch.pick_device(env)
        except UserError as e:
            found.append(str(e))
        info["device"] = str(device) if device is not None else None
        backend = "none"
        if env.world_size > 1:
            try:
                backend = resolve_backend(cfg.dist.backend, device or torch.device("cpu"))
            except UserError as e:
                backend = cfg.dist.backend
                found.append(str(e))
        info["backend"] = backend
        if env.world_size > 1:
            host, port = head_address(env, environ)
            resolved = resolve_head(host)
            if resolved is None and env.launcher == "slurm":
                found.append(f"head host {host!r} (first of SLURM_JOB_NODELIST) does not resolve")
            info["head"] = {"address": host, "port": port, "resolves_to": resolved}
        found += problems(env, environ)
        info["threads"] = threads_for(env, device, environ)
    info["cpus"] = {
        "os_cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "OMP_NUM_THREADS": environ.get("OMP_NUM_THREADS"),
    }
    if "SLURM_JOB_ID" in environ:
        info["slurm"] = {
            "job_id": environ.get("SLURM_JOB_ID"),
            "job_name": environ.get("SLURM_JOB_NAME"),
            "nodelist": environ.get("SLURM_JOB_NODELIST"),
            "nodes": env_int(environ, "SLURM_JOB_NUM_NODES"),
            "restart_count": int(environ.get("SLURM_RESTART_COUNT", "0") or 0),
            "step_id": environ.get("SLURM_STEP_ID"),  # None: the batch shell (not an srun step)
            "ntasks": env_int(environ, "SLURM_NTASKS"),
            "procid": env_int(environ, "SLURM_PROCID"),
            "tasks_on_node": slurm_tasks_on_node(environ),
            "cpus_on_node": env_int(environ, "SLURM_CPUS_ON_NODE"),
            "gpus_on_node": environ.get("SLURM_GPUS_ON_NODE") or environ.get("SLURM_GPUS_PER_NODE"),
            "partition": environ.get("SLURM_JOB_PARTITION"),
        }
    info["run_dir"] = cfg.log.out or os.path.join("runs", default_run_name(cfg, environ))
    info["resume"] = effective_resume(cfg, environ)
    info["problems"] = list(dict.fromkeys(found))
    return info


def render(info: dict) -> str:
    rows = [
        ("host", f"{info['host']} (python {info['python']}, torch {info['torch']})"),
        ("launcher", info["launcher"]),
    ]
    if "rank" in info:
        rows += [
            ("rank", f"{info['rank']} of world size {info['world_size']}"),
            ("local rank", f"{info['local_rank']} of {info['local_world_size']} on this node"),
            ("device", info["device"]),
            ("backend", info["backend"]),
        ]
        if "head" in info:
            h = info["head"]
            rows.append(("head", f"{h['address']}:{h['port']} (resolves to {h['resolves_to'] or 'nothing'})"))
    c = info["cuda"]
    rows.append(
        ("cuda", f"available, {c['gpus']} GPU(s): {', '.join(c['names'])}" if c["available"] else "not available")
    )
    if c["CUDA_VISIBLE_DEVICES"] is not None:
        rows.append(("CUDA_VISIBLE_DEVICES", c["CUDA_VISIBLE_DEVICES"]))
    cpus = info["cpus"]
    rows.append(
        (
            "threads",
            f"{info.get('threads', '?')} (OMP_NUM_THREADS={cpus['OMP_NUM_THREADS'] or 'unset'}, "
            f"{cpus['affinity']} usable of {cpus['os_cpu_count']} CPUs)",
        )
    )
    if "slurm" in info:
        s = info["slurm"]
        step = f"step {s['step_id']}" if s["step_id"] is not None else "batch shell (no srun step)"
        rows += [
            (
                "slurm job",
                f"{s['job_id']} ({s['job_name']}), partition {s['partition']}, restart count {s['restart_count']}",
            ),
            (
                "slurm nodes",
                f"{s['nodelist']} ({s['nodes']} node(s)), {s['cpus_on_node']} CPU(s) and "
                f"{s['gpus_on_node'] or 0} GPU(s) on this node",
            ),
            ("slurm tasks", f"{step}, task {s['procid']} of {s['ntasks']}, {s['tasks_on_node']} on this node"),
        ]
    rows += [
        ("run dir", info["run_dir"]),
        ("resume", info["resume"]),
        ("checks", "ok" if not info["problems"] else f"{len(info['problems'])} problem(s)"),
    ]
    rows += [("problem", p) for p in info["problems"]]
    prefix = f"[rank {info['rank']}] " if info.get("world_size", 1) > 1 else ""
    return "\n".join(f"{prefix}{k:<12} {v}" for k, v in rows)


def main_doctor(argv, prog: str = "dist-cnn doctor") -> int:
    """`dist-cnn doctor [train flags] [--json]` and `train.py --dry-run [flags]`: exit 0 when fine,
    2 (with the first problem as the one-line error) when the run would not start."""
    parser = config_mod.train_parser(prog)
    parser.description = (
        "Print what a training run started this way would do (launcher, ranks, device, "
        "backend, head address, SLURM job, CUDA, threads) and check the launch against "
        "the allocation, without training. Takes the training flags."
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ns = parser.parse_args(list(argv))
    info = collect(config_mod.from_args(ns))
    print(json.dumps(info) if ns.json else render(info), flush=True)
    if info["problems"]:
        raise UserError(info["problems"][0])
    return 0
