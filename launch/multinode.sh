#!/usr/bin/env bash
# Several nodes through torchrun's c10d rendezvous. Run the same command on every node, changing only
# --node-rank; e.g. two nodes n1 (10.77.0.1) and n2, one process each, restartable once:
#   n1$ bash launch/multinode.sh --nnodes 2 --node-rank 0 --head 10.77.0.1:29500 --procs 1 --run-id job7 --max-restarts 1 --out runs/job7 [train.py options]
#   n2$ bash launch/multinode.sh --nnodes 2 --node-rank 1 --head 10.77.0.1:29500 --procs 1 --run-id job7 --max-restarts 1 --out runs/job7 [train.py options]
# (tests/e2e/test_multinode_netns.py runs exactly this on two network namespaces with their own
# addresses and host names.)
# --head HOST[:PORT] (port 29500 by default) is node rank 0's address: that node hosts the rendezvous;
# the c10d rendezvous then numbers the nodes itself. --procs defaults to the GPU count of the node.
# --run-id must be the same on all nodes (default: dist_cnn). --max-restarts K: after a failure the
# surviving nodes restart their workers and wait for the missing node; run this command again there
# and the job resumes from its newest checkpoint. Every node's host name must resolve, on every node,
# to an address the others reach (gloo picks its interface that way; else set GLOO_SOCKET_IFNAME).
# DIST_CNN_PYTHON / DIST_CNN_VENV: the interpreter; DIST_CNN_ENTRY: the script (default train.py).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${DIST_CNN_PYTHON:-${DIST_CNN_VENV:-$root/.venv}/bin/python}"
nnodes="" node_rank="" head="" procs="" run_id="dist_cnn" restarts=0
while [ $# -gt 0 ]; do
  case "$1" in
    --nnodes) nnodes="$2"; shift 2 ;;
    --node-rank) node_rank="$2"; shift 2 ;;
    --head) head="$2"; shift 2 ;;
    --procs) procs="$2"; shift 2 ;;
    --run-id) run_id="$2"; shift 2 ;;
    --max-restarts) restarts="$2"; shift 2 ;;
    *) break ;;
  esac
done
if [ -z "$nnodes" ] || [ -z "$node_rank" ] || [ -z "$head" ]; then
  echo "launch/multinode.sh: --nnodes, --node-rank and --head HOST[:PORT] are required" >&2; exit 2
fi
[[ "$head" == *:* ]] || head="$head:29500"
if [ -z "$procs" ]; then
  procs="$("$py" -c 'import torch; print(torch.cuda.device_count())')"
  [ "$procs" != 0 ] || { echo "launch/multinode.sh: no GPU found; pass --procs N" >&2; exit 2; }
fi
is_host=$([ "$node_rank" = 0 ] && echo 1 || echo 0)
# Each rendezvous round gets a fresh store for its workers (hosted by rank 0's process). With
# torch's default, one store shared by all rounds, a node that comes back as a new torchrun agent
# after a failure waits for an address that only the first round published, and never rejoins.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"
# dist_cnn.distributed.torchrun: torchrun that checks the training flags before starting workers (see launch/node.sh).
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m dist_cnn.distributed.torchrun --nnodes="$nnodes" --node_rank="$node_rank" --nproc_per_node="$procs" \
  --rdzv_backend=c10d --rdzv_endpoint="$head" --rdzv_id="$run_id" --rdzv_conf="is_host=$is_host" \
  --max_restarts="$restarts" "${DIST_CNN_ENTRY:-$root/train.py}" "$@"
