#!/usr/bin/env bash
# Create (or reuse) .venv and install dist_cnn into it. Idempotent: a second run takes seconds.
# torch 2.14.1 / torchvision 0.29.1 are pinned for the clusters this was built on; override with
# DIST_CNN_TORCH="torch==X torchvision==Y" for another CUDA stack.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DIST_CNN_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
stamp="$venv/.dist_cnn_installed"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install -q ${DIST_CNN_TORCH:-torch==2.14.1 torchvision==0.29.1} 2>&1 | grep -v "is ignored" || true
  "$venv/bin/python" -m pip install -q -e "$root[dev]" 2>&1 | grep -v "is ignored" || true
  "$venv/bin/python" -c "import dist_cnn, torch, torchvision, wandb" && touch "$stamp"
fi
