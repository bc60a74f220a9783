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
# Pinned versions (launch/constraints.txt) keep pip's resolver linear; DIST_CNN_CONSTRAINTS= (empty) lifts them.
# Another torch (DIST_CNN_TORCH) drops the pins unless DIST_CNN_CONSTRAINTS names a file.
default_constraints="$root/launch/constraints.txt"
if [ -n "${DIST_CNN_TORCH:-}" ]; then default_constraints=""; fi
constraints="${DIST_CNN_CONSTRAINTS-$default_constraints}"
pin=()
if [ -n "$constraints" ]; then pin=(-c "$constraints"); fi
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ] || [ "$root/launch/constraints.txt" -nt "$stamp" ]; then
  "$venv/bin/python" -m pip install -q --upgrade pip
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip install -q ${DIST_CNN_TORCH:-torch==2.14.1 torchvision==0.29.1}
  "$venv/bin/python" -m pip install -q "${pin[@]}" -e "$root[dev]"
  "$venv/bin/python" -c "import dist_cnn, torch, torchvision, wandb" && touch "$stamp"
fi
