"""The Kubernetes manifests (k8s/*.yaml) as the tests read them: the trainer container of each kind
of pod, Kubernetes' $(VAR) expansion, and the environment each operator sets in its pods."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tests.support.common import ROOT

K8S = ROOT / "k8s"
IMAGE_ROOT = "/app"  # the Dockerfile's WORKDIR: this checkout, in the tests
JOB = "dist-cnn"  # metadata.name of both manifests


def load(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def containers(name: str) -> dict[str, dict]:
    """{pod kind: trainer container}: Master/Worker of the PyTorchJob, node of the TrainJob."""
    doc = load(name)
    if doc["kind"] == "PyTorchJob":
        specs = doc["spec"]["pytorchReplicaSpecs"]
        return {kind: spec["template"]["spec"]["containers"][0] for kind, spec in specs.items()}
    return {"node": doc["spec"]["trainer"]}


def expand(arg: str, env: dict) -> str:
    """Kubernetes' expansion of command and args: $(NAME) from the container's environment, $$ for $."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)) if m.group(1) else "$", arg
    )


def pytorchjob_env(pod_index: int, pods: int, port: int) -> dict:
    """What training-operator v1 sets in a PyTorchJob pod (master is pod 0; worker i is pod i + 1)."""
    return {
        "PYTHONUNBUFFERED": "0",
        "MASTER_ADDR": f"{JOB}-master-0",
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(pods),
        "RANK": str(pod_index),
    }


def trainjob_env(pod_index: int, pods: int, nproc_per_node) -> dict:
    """What Kubeflow Trainer v2's torch-distributed runtime sets in a TrainJob pod."""
    return {
        "PET_NNODES": str(pods),
        "PET_NPROC_PER_NODE": str(nproc_per_node),
        "PET_NODE_RANK": str(pod_index),
        "JOB_COMPLETION_INDEX": str(pod_index),
        "PET_MASTER_ADDR": f"{JOB}-node-0-0.{JOB}",
        "PET_MASTER_PORT": "29500",
    }


def pod_host_names(pods: int) -> dict[int, list[str]]:
    """{pod index: the names it has in the cluster's DNS} under each operator."""
    names = {0: [f"{JOB}-master-0", f"{JOB}-node-0-0.{JOB}"]}
    for i in range(1, pods):
        names[i] = [f"{JOB}-worker-{i - 1}", f"{JOB}-node-0-{i}.{JOB}"]
    return names


def in_checkout(args: list[str]) -> list[str]:
    """The image's paths (/app/...) as this checkout's."""
    return [str(ROOT / a[len(IMAGE_ROOT) + 1 :]) if a.startswith(IMAGE_ROOT + "/") else a for a in args]


def train_flags(args: list[str]) -> list[str]:
    """The flags after the entry script (train.py) of a container's command + args."""
    i = next(i for i, a in enumerate(args) if Path(a).name == "train.py")
    return args[i + 1 :]
