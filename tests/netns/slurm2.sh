#!/usr/bin/env bash
# A real two-node SLURM cluster on one machine: nodes n1 and n2 are network namespaces with their own
# addresses and host names (tests/netns/netns.sh), each with its own slurmd; munged and slurmctld run
# on n1. Everything (config, munge key and socket, state, spool, PID and log files) lives in a
# directory of its own, with its own ports, so it never meets the one-node test cluster
# (tests/slurm/cluster.sh), which may run at the same time.
#
#   tests/netns/slurm2.sh start    # make the namespaces, start the daemons, wait until both nodes are idle
#   tests/netns/slurm2.sh stop     # cancel jobs, stop the daemons, delete the namespaces (idempotent)
#   tests/netns/slurm2.sh status   # exit 0 when every daemon runs and both nodes answer
#   tests/netns/slurm2.sh env      # eval "$(tests/netns/slurm2.sh env)": sbatch, squeue, ... reach this cluster
#
# The client commands must run inside the namespaces (the cluster's addresses exist only there):
# `start` writes wrappers for sbatch, srun, squeue, sinfo, scontrol and scancel into $D/bin that run
# the real command on n1; `env` puts them first on PATH. A job sees the real commands.
#
# Environment (all optional):
#   DIST_CNN_SLURM2_DIR          state directory              (default /tmp/dist_cnn_slurm2)
#   DIST_CNN_SLURM2_NETNS        namespace name prefix (netns.sh NAME; default dcnslurm2)
#   DIST_CNN_SLURM2_CTLD_PORT    slurmctld port               (default 6837)
#   DIST_CNN_SLURM2_SLURMD_PORT  slurmd port                  (default 6838)
#   DIST_CNN_SLURM2_CPUS         CPUs each node advertises    (default 8)
#   DIST_CNN_SLURM2_START_TIMEOUT seconds to wait for idle nodes (default 60)
#   DIST_CNN_SLURM_CRED_EXPIRE   requeue delay, as in cluster.sh (default 10)
#
# Needs root and the packages from tests/slurm/install.sh. See tests/slurm/README.md.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
NETNS_SH="$HERE/netns.sh"
D="${DIST_CNN_SLURM2_DIR:-/tmp/dist_cnn_slurm2}"
NAME="${DIST_CNN_SLURM2_NETNS:-dcnslurm2}"
CONF="$D/slurm.conf"
MUNGE_DIR="$D/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
RUN="$D/run"
LOG="$D/log"
BIN="$D/bin"
CTLD_PORT="${DIST_CNN_SLURM2_CTLD_PORT:-6837}"
SLURMD_PORT="${DIST_CNN_SLURM2_SLURMD_PORT:-6838}"
CPUS="${DIST_CNN_SLURM2_CPUS:-8}"
START_TIMEOUT="${DIST_CNN_SLURM2_START_TIMEOUT:-60}"
CRED_EXPIRE="${DIST_CNN_SLURM_CRED_EXPIRE:-10}"
SUBNET="${DIST_CNN_NETNS_SUBNET:-10.77.0}"
NODES=(n1 n2)
CLIENTS=(sbatch srun squeue sinfo scontrol scancel)
export SLURM_CONF="$CONF"

log() { echo "slurm2 cluster: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

on_node() { local i=$1; shift; "$NETNS_SH" exec "$NAME" "$i" "$@"; }   # i: 1 or 2
client() { on_node 1 "$@"; }   # a SLURM client command, run on n1

# ---- process bookkeeping (PID files; never by name) -------------------------

pid_of() {   # pid_of FILE-STEM COMM: the PID recorded in $RUN/STEM.pid if it is alive and is COMM
    local f="$RUN/$1.pid" pid comm
    [ -r "$f" ] || return 1
    pid=$(tr -dc '0-9' <"$f")
    [ -n "$pid" ] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [ "$comm" = "$2" ] || return 1
    if grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null; then return 1; fi
    echo "$pid"
}

# alive STEM: the process recorded in $RUN/STEM.pid still exists (during start-up its name is still
# that of the exec chain that becomes the daemon: netns.sh, ip, unshare, sh).
alive() {
    local pid
    pid=$(tr -dc '0-9' <"$RUN/$1.pid" 2>/dev/null) && [ -n "$pid" ] && [ -d "/proc/$pid" ] &&
        ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null
}

DAEMONS=("munged munged" "slurmctld slurmctld" "slurmd-n1 slurmd" "slurmd-n2 slurmd")

# launch STEM NODE CMD...: CMD on node NODE in a session of its own, output to $LOG/STEM.out.
# setsid (not a group leader here) and netns.sh exec both exec, so $! ends up as the daemon's PID.
launch() {
    local stem=$1 node=$2; shift 2
    setsid "$NETNS_SH" exec "$NAME" "$node" "$@" </dev/null >>"$LOG/$stem.out" 2>&1 9>&- &
    echo $! >"$RUN/$stem.pid"
}

all_running() {
    local d
    for d in "${DAEMONS[@]}"; do pid_of $d >/dev/null || return 1; done
}

stop_daemon() {   # stop_daemon STEM COMM
    local pid _
    if ! pid=$(pid_of "$1" "$2"); then rm -f "$RUN/$1.pid"; return 0; fi
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        pid_of "$1" "$2" >/dev/null || break
        sleep 0.1
    done
    if pid_of "$1" "$2" >/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    rm -f "$RUN/$1.pid"
}

log_tail() {
    local f
    for f in "$LOG"/*.log "$LOG"/*.out; do
        [ -s "$f" ] || continue
        echo "----- tail of $f -----" >&2
        tail -n 20 "$f" >&2
    done
}

# ---- configuration ------------------------------------------------------------

write_conf() {
    local mem first_job
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n1)
    [ -n "$mem" ] || die "cannot read RealMemory from 'slurmd -C'"
    # Each node gets a share of the memory: both run on this machine.
    mem=$((mem / 2))
    first_job=1
    if [ -f "$LOG/slurmctld.log" ]; then   # job IDs go on across restarts (output files are appended to)
        first_job=$(grep -o 'JobId=[0-9]*' "$LOG/slurmctld.log" | cut -d= -f2 | sort -n | tail -n1 || true)
        first_job=$(( ${first_job:-0} + 1 ))
    fi
    # As tests/slurm/cluster.sh (see tests/slurm/README.md for each setting), except: two nodes at
    # their namespace addresses, per-node spool/PID/log files (%n: the node name), own ports.
    cat >"$CONF" <<EOF
# Generated by tests/netns/slurm2.sh -- a two-node test cluster in network namespaces. Do not edit.
ClusterName=distcnn2
SlurmctldHost=n1($SUBNET.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE
StateSaveLocation=$D/ctld
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$RUN/slurmctld.own.pid
SlurmdPidFile=$RUN/slurmd-%n.own.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
JobRequeue=1
EnforcePartLimits=ALL
MinJobAge=300
FirstJobId=$first_job
ReturnToService=2
InactiveLimit=0
KillWait=30
SlurmdParameters=config_overrides
NodeName=n1 NodeAddr=$SUBNET.1 CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
NodeName=n2 NodeAddr=$SUBNET.2 CPUs=$CPUS Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
}

write_wrappers() {
    local c real
    mkdir -p "$BIN"
    for c in "${CLIENTS[@]}"; do
        real=$(command -v "$c") || die "$c not found"
        # The wrapper drops its own directory from PATH, so that a job submitted through it sees
        # the real commands.
        cat >"$BIN/$c" <<EOF
#!/bin/sh
# Generated by tests/netns/slurm2.sh: $c on node n1 of the two-node test cluster.
PATH=\$(printf '%s' "\$PATH" | tr ':' '\n' | grep -vxF '$BIN' | paste -sd: -)
export PATH SLURM_CONF='$CONF' DIST_CNN_SLURM2_DIR='$D'
exec '$NETNS_SH' exec '$NAME' 1 '$real' "\$@"
EOF
        chmod +x "$BIN/$c"
    done
}

# ---- daemons ----------------------------------------------------------------------

start_munged() {
    mkdir -p "$MUNGE_DIR"
    chmod 0755 "$MUNGE_DIR"
    if [ ! -s "$MUNGE_DIR/munge.key" ]; then
        mungekey --create --keyfile="$MUNGE_DIR/munge.key" --force >/dev/null
    fi
    chmod 0600 "$MUNGE_DIR/munge.key"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    launch munged 1 munged -F --force \
        --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$LOG/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed"
    local _
    for _ in $(seq 1 100); do
        if [ -S "$MUNGE_SOCKET" ] && munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; then
            return 0
        fi
        alive munged || break
        sleep 0.1
    done
    log_tail
    die "munged did not come up (socket $MUNGE_SOCKET)"
}

start_slurmctld() {
    launch slurmctld 1 slurmctld -D -c -f "$CONF"
    local _
    for _ in $(seq 1 150); do
        client scontrol ping 2>/dev/null | grep -q 'is UP' && return 0
        alive slurmctld || break
        sleep 0.2
    done
    log_tail
    die "slurmctld did not come up"
}

wait_idle() {
    local deadline=$((SECONDS + START_TIMEOUT)) states="" stem
    while [ $SECONDS -lt $deadline ]; do
        for stem in munged slurmctld slurmd-n1 slurmd-n2; do
            alive "$stem" || { log_tail; die "$stem exited during start-up (state dir $D)"; }
        done
        states=$(client sinfo -h -N -o '%N=%T' 2>/dev/null | sort -u | tr '\n' ' ' || true)
        if [[ "$states" =~ n1=(idle|mixed|allocated) ]] && [[ "$states" =~ n2=(idle|mixed|allocated) ]]; then
            return 0
        fi
        sleep 0.2
    done
    log_tail
    die "nodes not idle after ${START_TIMEOUT}s (sinfo: '${states:-no answer}'; state dir $D)"
}

cmd_start() {
    local b t0=$SECONDS
    for b in munged mungekey munge unmunge slurmctld slurmd "${CLIENTS[@]}" ip unshare; do
        command -v "$b" >/dev/null || die "$b not found: run tests/slurm/install.sh"
    done
    [ "$(id -u)" -eq 0 ] || die "must run as root (network namespaces; SlurmUser=root)"
    if all_running; then
        wait_idle
        echo "already running (SLURM_CONF=$CONF)"
        return 0
    fi
    stop_all >/dev/null
    mkdir -p "$D" "$D/ctld" "$RUN" "$LOG" "${NODES[@]/#/$D/spool/}"
    chmod 0755 "$D"
    "$NETNS_SH" up "$NAME" 2 >/dev/null
    write_conf
    write_wrappers
    start_munged
    start_slurmctld
    launch slurmd-n1 1 slurmd -D -f "$CONF"
    launch slurmd-n2 2 slurmd -D -f "$CONF"
    wait_idle
    echo "started in $((SECONDS - t0))s (SLURM_CONF=$CONF, nodes n1=$SUBNET.1 n2=$SUBNET.2 in namespaces $NAME-1/2)"
}

stop_all() {
    local jobs _
    if pid_of slurmctld slurmctld >/dev/null; then
        jobs=$(client squeue -h -o '%i' 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            log "cancelling jobs: $(tr '\n' ' ' <<<"$jobs")"
            # shellcheck disable=SC2086
            client scancel $jobs 2>/dev/null || true
            for _ in $(seq 1 200); do
                [ -z "$(client squeue -h -o '%i' 2>/dev/null || true)" ] && break
                sleep 0.25
            done
        fi
    fi
    stop_daemon slurmd-n2 slurmd
    stop_daemon slurmd-n1 slurmd
    stop_daemon slurmctld slurmctld
    stop_daemon munged munged
    # Whatever still runs on the nodes (job processes) goes with the namespaces.
    "$NETNS_SH" down "$NAME" >/dev/null
    echo "stopped"
}

cmd_status() {
    local d rc=0 pid
    for d in "${DAEMONS[@]}"; do
        set -- $d
        if pid=$(pid_of "$1" "$2"); then echo "$1: running (pid $pid)"; else echo "$1: not running"; rc=1; fi
    done
    if [ $rc = 0 ]; then
        client sinfo -N || rc=1
        client squeue || rc=1
    fi
    echo "SLURM_CONF=$CONF"
    return $rc
}

with_lock() {
    mkdir -p "$D"
    exec 9>"$D/.lock"
    flock -w 120 9 || die "could not lock $D/.lock"
    "$@"
}

case "${1:-}" in
    start)  with_lock cmd_start ;;
    stop)   if [ -d "$D" ]; then with_lock stop_all; else "$NETNS_SH" down "$NAME" >/dev/null; echo "stopped"; fi ;;
    status) cmd_status ;;
    env)    echo "export PATH=$BIN:\$PATH"; echo "export SLURM_CONF=$CONF" ;;
    *)      echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
