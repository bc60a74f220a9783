#!/usr/bin/env bash
# One process (one GPU, or the CPU): set up .venv, then `python train.py "$@"`.
# With no --data-dir given and the shared CIFAR-10 archive beside the checkout, it is unpacked once
# into data/cifar10-jpeg and trained on (dataset imagefolder).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/launch/setup.sh"
cd "$root"
args=("$@")
archive="${DIST_CNN_CIFAR_ARCHIVE:-$root/../shared/data/cifar10-jpeg.tar.gz}"
if [[ " $* " != *" --data-dir "* && " $* " != *" --dataset "* && " $* " != *" --config "* && -f "$archive" ]]; then
  if [ ! -d data/cifar10-jpeg/train ]; then
    mkdir -p data/cifar10-jpeg.partial && tar -xzf "$archive" -C data/cifar10-jpeg.partial
    inner="$(dirname "$(find data/cifar10-jpeg.partial -maxdepth 3 -type d -name train | head -1)")"
    mv "$inner" data/cifar10-jpeg && rm -rf data/cifar10-jpeg.partial
  fi
  args=(--dataset imagefolder --data-dir data/cifar10-jpeg "${args[@]}")
fi
exec "${DIST_CNN_VENV:-$root/.venv}/bin/python" train.py "${args[@]}"
