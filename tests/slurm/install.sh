#!/usr/bin/env bash
# Idempotent install of a local SLURM + munge (Debian 12 / SLURM 22.05).
# Used by .ci/run before the test suite; safe to run repeatedly.
# Download ~3.5 MB, ~7 s on a fresh machine; a no-op when already installed.
set -euo pipefail

PKGS=(munge slurmd slurmctld slurm-client)

missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "slurm install: already installed (${PKGS[*]})"
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

export DEBIAN_FRONTEND=noninteractive
echo "slurm install: installing ${missing[*]}"
$SUDO apt-get update -qq
# Package postinst scripts try to start the services via invoke-rc.d; without
# systemd/init that fails harmlessly or is refused by policy-rc.d. We start the
# daemons ourselves (tests/slurm/cluster.sh), so forbid service starts here.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod +x "$policy"
    created_policy=1
fi
cleanup() { if [ "$created_policy" = 1 ]; then $SUDO rm -f "$policy"; fi; }
trap cleanup EXIT

$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
for b in munged mungekey slurmctld slurmd sbatch srun squeue sinfo scontrol scancel; do
    command -v "$b" >/dev/null || { echo "slurm install: $b missing after install" >&2; exit 1; }
done
echo "slurm install: done"
