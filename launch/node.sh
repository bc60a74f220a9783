#!/usr/bin/env bash
# One node, several processes: torchrun with one process per GPU, or N CPU processes (gloo).
#   bash launch/node.sh [--procs N] [train.py options]
# --procs defaults to the number of GPUs; on a machine without GPUs it is required.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${DIST_CNN_PYTHON:-${DIST_CNN_VENV:-$root/.venv}/bin/python}"
procs=""
if [ "${1:-}" = "--procs" ]; then procs="$2"; shift 2; fi
if [ -z "$procs" ]; then
  procs="$("$py" -c 'import torch; print(torch.cuda.device_count())')"
  if [ "$procs" = 0 ]; then
    echo "launch/node.sh: no GPU found; pass --procs N to run N CPU processes" >&2; exit 2
  fi
fi
# dist_cnn.distributed.torchrun is torchrun that checks the training flags once before starting the workers and
# reports a failed worker in one line (DIST_CNN_TORCHRUN_VERBOSE=1: torchrun's full report).
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$py" -m dist_cnn.distributed.torchrun --standalone --nnodes=1 --nproc_per_node="$procs" "$root/train.py" "$@"
