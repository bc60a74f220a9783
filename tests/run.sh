#!/usr/bin/env bash
# The test suite from a fresh clone: .venv, the Debian packages the tests use (a real SLURM
# controller, Fashion-MNIST), then pytest. Extra arguments go to pytest (e.g. tests/unit, -k ddp, -m "not slow").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup.sh"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  bash "$root/tests/slurm/install.sh"
  if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null \
      || echo "note: dataset-fashion-mnist not installed; its test will skip" >&2
  fi
fi
cd "$root"
export WANDB_SILENT=true
exec "${DIST_CNN_VENV:-$root/.venv}/bin/python" -m pytest -q -ra --durations=15 -n "${DIST_CNN_TEST_WORKERS:-3}" --no-loadscope-reorder "$@"
