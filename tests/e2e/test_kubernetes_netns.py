"""The Kubernetes manifests' container commands (k8s/pytorchjob.yaml, k8s/trainjob.yaml) run as two
"pods": two network-namespace hosts of their own address and host name (tests/netns/netns.sh), where
the cluster DNS names the operator puts in MASTER_ADDR / PET_MASTER_ADDR resolve to the first pod.
Each pod gets the environment its operator sets, its command is expanded as Kubernetes expands it,
and the training flags are the test's small ones; the job completes with world size 2.

Needs root (network, mount and UTS namespaces): skipped with the reason otherwise, an error under CI.
"""

from __future__ import annotations

import os

import pytest

from tests.e2e.test_multinode_netns import SUBNET, agent_env, log_text, make_nodes, unique_name, wait_all
from tests.support import kube
from tests.support.common import PY, SMALL, read_summary

pytestmark = pytest.mark.slow

PODS = 2
FLAGS = [*SMALL, "--max-steps", "6", "--eval-every", "0"]


@pytest.fixture
def pods(tmp_path):
    """Two nodes whose hosts files also carry the pods' cluster DNS names."""
    nodes = make_nodes(unique_name("k"), tmp_path)
    try:
        lines = "".join(f"{SUBNET}.{i + 1} {' '.join(names)}\n" for i, names in kube.pod_host_names(PODS).items())
        for i in range(1, PODS + 1):
            with open(f"/etc/netns/{nodes.name}-{i}/hosts", "a") as f:
                f.write(lines)
        master = kube.pod_host_names(PODS)[0][0]
        assert nodes.run(2, ["getent", "hosts", master]).split() == [f"{SUBNET}.1", *kube.pod_host_names(PODS)[0]]
        yield nodes
    finally:
        nodes.down()


def pod_command(container: dict, out) -> list[str]:
    """The container's command with the test's flags in place of its args, in this checkout."""
    return kube.in_checkout([*container["command"], *map(str, FLAGS), "--out", str(out)])


def run_pods(pods, commands_envs, tag: str) -> list:
    # torchrun from the environment the tests run in (the image has it on PATH)
    path = f"{os.path.dirname(PY)}:{os.environ.get('PATH', '')}"
    procs = []
    for i, (cmd, env) in enumerate(commands_envs):
        full_env = agent_env(PATH=path, **env)
        procs.append(pods.start(i + 1, [kube.expand(a, full_env) for a in cmd], tag, full_env))
    codes = wait_all(procs, timeout=240)
    assert codes == [0] * len(procs), [log_text(p)[-3000:] for p in procs]
    return procs


@pytest.mark.timeout(420)
def test_pytorchjob_pods_complete_with_world_size_2(pods, tmp_path):
    out = tmp_path / "run"
    c = kube.containers("pytorchjob.yaml")
    port = c["Master"]["ports"][0]["containerPort"]
    kinds = ["Master"] + ["Worker"] * (PODS - 1)
    run_pods(pods, [(pod_command(c[k], out), kube.pytorchjob_env(i, PODS, port)) for i, k in enumerate(kinds)], "v1")
    s = read_summary(out)
    assert (s["world_size"], s["backend"], s["steps"]) == (2, "gloo", 6), s


@pytest.mark.timeout(420)
def test_trainjob_pods_complete_with_world_size_2(pods, tmp_path):
    out = tmp_path / "run"
    node = kube.containers("trainjob.yaml")["node"]
    nproc = node["numProcPerNode"]
    assert node["numNodes"] == PODS
    run_pods(pods, [(pod_command(node, out), kube.trainjob_env(i, PODS, nproc)) for i in range(PODS)], "v2")
    s = read_summary(out)
    assert (s["world_size"], s["backend"], s["steps"]) == (2, "gloo", 6), s
