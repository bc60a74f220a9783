"""k8s/*.yaml and the Dockerfile, read without a cluster or a docker engine: the manifests parse, their
commands are torchrun ... train.py with flags that torchrun and train.py accept once the operator's
variables are expanded, and the Dockerfile copies what exists. The pods themselves run in
tests/e2e/test_kubernetes_netns.py."""

from __future__ import annotations

import shlex

import pytest
from torch.distributed.run import parse_args as torchrun_args

from dist_cnn.distributed.launch import detect, one_process_per_pod
from dist_cnn.distributed.torchrun import check_train_args
from tests.support import kube
from tests.support.common import ROOT


@pytest.mark.parametrize(
    "name,kind,pods",
    [("pytorchjob.yaml", "PyTorchJob", ["Master", "Worker"]), ("trainjob.yaml", "TrainJob", ["node"])],
)
def test_manifests_run_torchrun_with_flags_train_py_accepts(name, kind, pods):
    assert kube.load(name)["kind"] == kind and kube.load(name)["metadata"]["name"] == kube.JOB
    found = kube.containers(name)
    assert list(found) == pods
    for i, container in enumerate(found.values()):
        cmd = container["command"] + container.get("args", [])
        env = kube.pytorchjob_env(i, 2, 23456) if kind == "PyTorchJob" else kube.trainjob_env(i, 2, 1)
        expanded = [kube.expand(a, env) for a in cmd]
        assert expanded[0] == "torchrun" and "$(" not in " ".join(expanded), expanded
        assert check_train_args(kube.train_flags(expanded)) is None, shlex.join(expanded)
        script = next(a for a in expanded if a.endswith("train.py"))
        assert script == f"{kube.IMAGE_ROOT}/train.py"
        args = torchrun_args(expanded[1:])
        assert args.training_script == script


def test_pytorchjob_master_port_is_the_named_container_port():
    master = kube.containers("pytorchjob.yaml")["Master"]
    assert [p["name"] for p in master["ports"]] == ["pytorchjob-port"]  # the operator's MASTER_PORT


def test_trainjob_torchrun_takes_its_flags_from_the_runtime(monkeypatch):
    for k, v in kube.trainjob_env(1, 2, 1).items():
        monkeypatch.setenv(k, v)
    node = kube.containers("trainjob.yaml")["node"]
    args = torchrun_args(node["command"][1:])
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("2", "1", 1)
    assert (args.master_addr, args.master_port) == (f"{kube.JOB}-node-0-0.{kube.JOB}", 29500)


def test_pod_index_is_read_only_without_torchrun_in_a_pod():
    pod = {**kube.pytorchjob_env(1, 2, 23456), "KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    env = detect(pod)
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("kubeflow", 1, 2, 0)
    assert (env.master_addr, env.master_port) == (f"{kube.JOB}-master-0", 23456)
    # torchrun's workers (LOCAL_RANK...) in the same pod: torchrun's variables
    worker = {**pod, "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    assert not one_process_per_pod(worker)
    assert (detect(worker).launcher, detect(worker).rank) == ("torchrun", 3)
    # outside Kubernetes a half-set launch environment stays an error
    assert not one_process_per_pod(kube.pytorchjob_env(1, 2, 23456))


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            word, _, rest = current.partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    return out


def test_dockerfile_builds_from_a_base_image_argument_and_copies_what_exists():
    steps = dockerfile_instructions()
    known = {"ARG", "FROM", "ENV", "RUN", "WORKDIR", "COPY", "CMD", "ENTRYPOINT", "LABEL", "USER", "EXPOSE"}
    assert all(word in known for word, _ in steps), steps
    words = [w for w, _ in steps]
    assert steps[words.index("FROM")] == ("FROM", "${BASE_IMAGE}")
    args = {rest.split("=")[0] for w, rest in steps if w == "ARG"}
    assert {"BASE_IMAGE", "TORCH_INDEX_URL"} <= args
    assert ("WORKDIR", kube.IMAGE_ROOT) in steps  # where the manifests find train.py
    copied = []
    for w, rest in steps:
        if w == "COPY":
            *sources, _ = shlex.split(rest)
            copied += sources
            for s in sources:
                assert (ROOT / s).exists(), f"COPY {s}: no such file in the repository"
    assert {"pyproject.toml", "dist_cnn", "train.py"} <= set(copied)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not any(c in ignored for c in copied)
