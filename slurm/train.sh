#!/usr/bin/env bash
# dist_cnn on SLURM:   sbatch [sbatch options] slurm/train.sh [train.py options]
#
# Every #SBATCH default below can be overridden on the sbatch command line, e.g.
#   sbatch --nodes=2 --gpus-per-node=8 --ntasks-per-node=8 slurm/train.sh --config configs/x.yaml
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 slurm/train.sh ...   # CPU partition (gloo)
# The arguments after the script name are passed to train.py unchanged.
#
# Defaults (a 4-GPU node; change --gpus-per-node AND --ntasks-per-node together):
#   --job-name=dist_cnn         output file name and squeue name
#   --nodes=1                   number of nodes
#   --gpus-per-node=4           GPUs per node; 0 on a CPU-only partition
#   --ntasks-per-node=4         training processes per node: one per GPU (with 0 GPUs: the
#                               number of CPU processes per node). It sizes the allocation in
#                               both modes; see "launch modes".
#   --cpus-per-task=8           CPUs per training process (data-loader workers, OMP threads)
#   --time=04:00:00             time limit; the job is warned 120 s before (see --signal)
#   --output=slurm-%x-%j.out    in the submit directory; %x job name, %j job id
#   --open-mode=append          a requeued job appends to the same file
#   --signal=B:USR1@120         SIGUSR1 to this batch shell 120 s before the time limit;
#                               it is forwarded to the training processes (see "signals")
#   --requeue                   the job may be requeued (preemption, scontrol requeue)
#
# Launch modes: environment variable DIST_CNN_LAUNCH (export it before sbatch; sbatch
# passes the submitting environment to the job):
#   torchrun (default)  One srun task per node (srun --ntasks=$SLURM_NNODES --ntasks-per-node=1,
#                       holding all of the node's allocated CPUs and GPUs) runs
#                         python -m dist_cnn.distributed.torchrun --nnodes=$SLURM_NNODES
#                           --nproc_per_node=P --rdzv_backend=c10d --rdzv_id=$SLURM_JOB_ID
#                           --rdzv_endpoint=<first host of the job>:<port from the job id> train.py ...
#                       P = GPUs per node when the job has GPUs, otherwise the job's tasks per
#                       node (so --gpus-per-node=0 --ntasks-per-node=2 gives 2 CPU processes per
#                       node); DIST_CNN_NPROC_PER_NODE overrides P. torchrun sets RANK,
#                       WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT.
#   srun                srun starts $SLURM_NTASKS copies of `python train.py ...`, i.e.
#                       --ntasks-per-node per node (make it the GPUs per node). Each process
#                       reads its rank from SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS and
#                       derives the head address from SLURM_JOB_NODELIST and the job id
#                       (dist_cnn/distributed.py). Every task sees all GPUs of its node and
#                       uses GPU number SLURM_LOCALID.
#   In both modes the training processes get the same allocation; only who starts them differs.
#
# Other environment variables:
#   DIST_CNN_PYTHON      Python interpreter; default $DIST_CNN_VENV/bin/python, else .venv/bin/python
#                        in the submit directory (launch/setup.sh makes it), else python on PATH
#   DIST_CNN_ENTRY       entry script (default train.py, relative to the submit directory)
#   DIST_CNN_RDZV_PORT   torchrun rendezvous port (default 20000 + job id % 20000)
#   OMP_NUM_THREADS      default: --cpus-per-task
#
# Signals and requeue: SLURM sends --signal's SIGUSR1 to this batch shell only ("B:"), and
# `scancel --signal=USR1 --batch JOB` does the same. The shell forwards SIGUSR1/SIGUSR2 to the
# srun step, and srun delivers them to every process of the step (torchrun and its workers
# alike). torchrun, and the training processes until they install a handler, ignore SIGUSR1:
# an early or unhandled SIGUSR1 never kills a run. SIGTERM (scancel, time limit, preemption)
# is sent by SLURM to every process of every step itself; this shell only keeps waiting so
# that the training processes can checkpoint (KillWait seconds before SIGKILL). train.py
# handles SIGUSR1/SIGTERM by checkpointing at the next step boundary, calls
# `scontrol requeue $SLURM_JOB_ID` itself and exits 0; the rerun resumes from the checkpoint
# (SLURM_RESTART_COUNT counts the restarts). This script exits with the step's exit code.
#
#SBATCH --job-name=dist_cnn
#SBATCH --nodes=1
#SBATCH --gpus-per-node=4
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@120
#SBATCH --requeue

set -uo pipefail

die() { echo "slurm/train.sh: error: $*" >&2; exit 2; }

[ -n "${SLURM_JOB_ID:-}" ] || die "submit this script with sbatch: sbatch slurm/train.sh [train.py options]"
cd "${SLURM_SUBMIT_DIR:-.}" || die "cannot cd to the submit directory ${SLURM_SUBMIT_DIR:-}"

if [ -n "${DIST_CNN_PYTHON:-}" ]; then PY="$DIST_CNN_PYTHON"
elif [ -n "${DIST_CNN_VENV:-}" ]; then PY="$DIST_CNN_VENV/bin/python"
elif [ -x .venv/bin/python ]; then PY="$(pwd)/.venv/bin/python"     # launch/setup.sh's venv
else PY=python; fi
ENTRY="${DIST_CNN_ENTRY:-train.py}"
LAUNCH="${DIST_CNN_LAUNCH:-torchrun}"
command -v "$PY" >/dev/null 2>&1 || die "Python interpreter '$PY' not found (set DIST_CNN_PYTHON)"
[ -f "$ENTRY" ] || die "entry script '$ENTRY' not found in $(pwd) (submit from the repository root or set DIST_CNN_ENTRY)"

# First number of a SLURM per-node count list: "4", "4(x2)", "4(x2),2" -> 4; a GPU spec
# "a100:4" -> 4.
first_count() { local v="${1%%,*}"; v="${v%%(*}"; v="${v##*:}"; echo "${v//[^0-9]/}"; }

nnodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
tasks_per_node="$(first_count "${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}")"
tasks_per_node="${tasks_per_node:-1}"
cpus_per_task="${SLURM_CPUS_PER_TASK:-1}"
gpus_per_node="$(first_count "${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-0}}")"
gpus_per_node="${gpus_per_node:-0}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$cpus_per_task}"

# Launched processes ignore SIGUSR1 until the training code installs its handler (an ignored
# disposition survives exec and is inherited by torchrun's workers; Python's signal.signal
# replaces it). torchrun itself never installs one, so it keeps ignoring it.
WRAP=(bash -c 'trap "" USR1 USR2; exec "$@"' dist_cnn_task)

# The training flags are checked once here, before any step starts: a bad flag is one line in the
# job's log and exit code 2, not one line per process plus torchrun's and srun's reports.
"$PY" -m dist_cnn.distributed.torchrun --check-only "$ENTRY" "$@" || exit $?

# Since SLURM 22.05 srun does not inherit --cpus-per-task from sbatch: pass it explicitly.
case "$LAUNCH" in
    torchrun)
        nproc="${DIST_CNN_NPROC_PER_NODE:-}"
        if [ -z "$nproc" ]; then
            if [ "$gpus_per_node" -gt 0 ]; then nproc=$gpus_per_node; else nproc=$tasks_per_node; fi
        fi
        head_host="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
        [ -n "$head_host" ] || die "cannot get the first host of SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
        port="${DIST_CNN_RDZV_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
        CMD=(srun --ntasks="$nnodes" --ntasks-per-node=1 --cpus-per-task=$((cpus_per_task * tasks_per_node))
             --kill-on-bad-exit=1
             "${WRAP[@]}" "$PY" -m dist_cnn.distributed.torchrun
             --nnodes="$nnodes" --nproc_per_node="$nproc"
             --rdzv_backend=c10d --rdzv_id="$SLURM_JOB_ID" --rdzv_endpoint="$head_host:$port"
             "$ENTRY" "$@")
        ;;
    srun)
        CMD=(srun --ntasks="${SLURM_NTASKS:-$((nnodes * tasks_per_node))}" --cpus-per-task="$cpus_per_task"
             --kill-on-bad-exit=1
             "${WRAP[@]}" "$PY" "$ENTRY" "$@")
        ;;
    *) die "DIST_CNN_LAUNCH must be torchrun or srun, not '$LAUNCH'" ;;
esac

echo "dist_cnn: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST" \
     "($nnodes node(s), $gpus_per_node GPU(s)/node, $tasks_per_node task(s)/node, $cpus_per_task CPU(s)/task)," \
     "launch=$LAUNCH, $(date -Is)"
echo "dist_cnn: ${CMD[*]}"

step_pid=""
# shellcheck disable=SC2317  # invoked by the traps below
forward() {   # forward a signal to the srun step (srun passes it to all of the step's processes)
    echo "dist_cnn: batch shell got SIG$1 at $(date -Is); forwarding to the training step"
    if [ -n "$step_pid" ]; then kill -s "$1" "$step_pid" 2>/dev/null || true; fi
}
trap 'forward USR1' USR1
trap 'forward USR2' USR2
trap 'echo "dist_cnn: batch shell got SIGTERM at $(date -Is); waiting for the step to finish"' TERM

# srun runs in the background: bash runs traps only between commands, and `wait` returns
# (status > 128) when a trapped signal arrives, so loop until the step has really ended.
"${CMD[@]}" &
step_pid=$!
while :; do
    wait "$step_pid"
    rc=$?
    [ "$rc" -le 128 ] && break
    kill -0 "$step_pid" 2>/dev/null && continue
    wait "$step_pid"; r2=$?          # already reaped: bash remembers its status
    [ "$r2" -ne 127 ] && rc=$r2
    break
done
echo "dist_cnn: step exited with status $rc at $(date -Is)"
exit "$rc"
