#!/usr/bin/env bash
# A real one-node SLURM cluster (munged + slurmctld + slurmd) for the test
# suite, without systemd, with all of its state in a directory of its own.
#
#   tests/slurm/cluster.sh start    # start (idempotent); waits until the node is idle
#   tests/slurm/cluster.sh stop     # cancel jobs, stop the daemons by PID (safe if not running)
#   tests/slurm/cluster.sh status   # exit 0 when all three daemons run and the node answers
#   tests/slurm/cluster.sh env      # prints `export SLURM_CONF=...`; use: eval "$(tests/slurm/cluster.sh env)"
#
# Environment (all optional):
#   DIST_CNN_SLURM_DIR         state directory            (default /tmp/dist_cnn_slurm)
#   DIST_CNN_SLURM_CPUS        CPUs the node advertises   (default: max(16, nproc))
#   DIST_CNN_SLURM_CTLD_PORT   slurmctld port             (default 6817)
#   DIST_CNN_SLURM_SLURMD_PORT slurmd port                (default 6818)
#   DIST_CNN_SLURM_START_TIMEOUT seconds to wait for an idle node (default 60)
#
# Needs root and the packages from tests/slurm/install.sh. See tests/slurm/README.md.
set -euo pipefail

D="${DIST_CNN_SLURM_DIR:-/tmp/dist_cnn_slurm}"
CONF="$D/slurm.conf"
MUNGE_DIR="$D/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
RUN="$D/run"
LOG="$D/log"
CTLD_PORT="${DIST_CNN_SLURM_CTLD_PORT:-6817}"
SLURMD_PORT="${DIST_CNN_SLURM_SLURMD_PORT:-6818}"
START_TIMEOUT="${DIST_CNN_SLURM_START_TIMEOUT:-60}"
CRED_EXPIRE="${DIST_CNN_SLURM_CRED_EXPIRE:-10}"
export SLURM_CONF="$CONF"

log() { echo "slurm cluster: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---- process bookkeeping (our own PID files; we never kill by name) --------

# pid_of NAME -> prints the PID recorded for daemon NAME if that process is
# alive and really is NAME (guards against PID reuse); fails otherwise.
pid_of() {
    local name=$1 f="$RUN/$1.pid" pid comm
    [ -r "$f" ] || return 1
    pid=$(tr -dc '0-9' <"$f")
    [ -n "$pid" ] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [ "$comm" = "$name" ] || return 1
    # a zombie is not running
    if grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null; then return 1; fi
    echo "$pid"
}

# started NAME: the process recorded for NAME still exists. Right after `launch` it may not have
# exec'd the daemon yet (its name is still the shell's), which pid_of would take for an exit.
started() {
    local pid
    pid=$(tr -dc '0-9' <"$RUN/$1.pid" 2>/dev/null) && [ -n "$pid" ] && [ -d "/proc/$pid" ] &&
        ! grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null
}

# launch NAME CMD... : run CMD in its own session in the background, stdout and
# stderr to $LOG/NAME.out, and record its PID.
launch() {
    local name=$1; shift
    # 9>&-: do not let the daemon inherit (and so hold) the lock on $D/.lock
    setsid "$@" </dev/null >>"$LOG/$name.out" 2>&1 9>&- &
    echo $! >"$RUN/$name.pid"
}

stop_daemon() {
    local name=$1 pid _
    if ! pid=$(pid_of "$name"); then rm -f "$RUN/$name.pid"; return 0; fi
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        pid_of "$name" >/dev/null || break
        sleep 0.1
    done
    if pid_of "$name" >/dev/null; then
        log "$name ($pid) ignored SIGTERM for 10 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.2
    fi
    rm -f "$RUN/$name.pid"
}

all_running() {
    pid_of munged >/dev/null && pid_of slurmctld >/dev/null && pid_of slurmd >/dev/null
}

any_running() {
    pid_of munged >/dev/null || pid_of slurmctld >/dev/null || pid_of slurmd >/dev/null
}

log_tail() {
    local f
    for f in "$LOG/munged.log" "$LOG/slurmctld.log" "$LOG/slurmd.log" \
             "$LOG/munged.out" "$LOG/slurmctld.out" "$LOG/slurmd.out"; do
        [ -s "$f" ] || continue
        echo "----- tail of $f -----" >&2
        tail -n 20 "$f" >&2
    done
}

node_name() { slurmd -C 2>/dev/null | sed -n 's/^NodeName=\([^ ]*\).*/\1/p' | head -n1; }

node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -n1; }

wait_idle() {
    local deadline=$((SECONDS + START_TIMEOUT)) state="" resumed=0
    while [ $SECONDS -lt $deadline ]; do
        if ! started munged || ! started slurmctld || ! started slurmd; then
            log_tail
            die "a daemon exited during start-up (state dir $D)"
        fi
        state=$(node_state || true)
        case "$state" in
            idle|mixed|allocated|completing) return 0 ;;
            # After an unclean stop the node can come back down/drained; resume it once.
            down*|drain*)
                if [ $resumed = 0 ]; then
                    scontrol update NodeName="$(node_name)" State=RESUME >/dev/null 2>&1 || true
                    resumed=1
                fi ;;
        esac
        sleep 0.2
    done
    log_tail
    die "node not idle after ${START_TIMEOUT}s (last sinfo state: '${state:-no answer}'; state dir $D)"
}

# ---- configuration ---------------------------------------------------------

ensure_hostname_resolves() {
    # slurmctld/slurmd/srun and torchrun's rendezvous use the host and node names.
    local h
    for h in $(hostname) $(node_name); do
        if ! getent hosts "$h" >/dev/null 2>&1; then
            log "host name '$h' does not resolve; adding it to /etc/hosts"
            echo "127.0.0.1 $h" >>/etc/hosts
        fi
    done
}

write_conf() {
    local line name cpus mem first_job
    line=$(slurmd -C | head -n1)
    name=$(sed -n 's/.*NodeName=\([^ ]*\).*/\1/p' <<<"$line")
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$line")
    if [ -z "$name" ] || [ -z "$mem" ]; then die "cannot parse 'slurmd -C': $line"; fi
    cpus=${DIST_CNN_SLURM_CPUS:-$(nproc)}
    if [ -z "${DIST_CNN_SLURM_CPUS:-}" ] && [ "$cpus" -lt 16 ]; then cpus=16; fi
    # The controller starts with clean state (-c) so that jobs of an earlier,
    # uncleanly stopped cluster never run again; job IDs continue after the
    # highest one this state directory has seen so that output files
    # (slurm-%x-%j.out, opened in append mode) are not reused.
    first_job=1
    if [ -f "$LOG/slurmctld.log" ]; then
        first_job=$(grep -o 'JobId=[0-9]*' "$LOG/slurmctld.log" | cut -d= -f2 | sort -n | tail -n1 || true)
        first_job=$(( ${first_job:-0} + 1 ))
    fi
    cat >"$CONF" <<EOF
# Generated by tests/slurm/cluster.sh -- a one-node test cluster. Do not edit.
ClusterName=distcnn
SlurmctldHost=$name
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE
StateSaveLocation=$D/ctld
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$RUN/slurmctld.own.pid
SlurmdPidFile=$RUN/slurmd.own.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# No systemd/cgroups here: track processes through /proc, no task binding, no accounting.
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
# Schedule (and restart requeued jobs) within seconds instead of minutes.
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
JobRequeue=1
# Reject impossible requests at submission instead of leaving them pending forever.
EnforcePartLimits=ALL
# Finished jobs stay visible to 'scontrol show job' for 5 minutes.
MinJobAge=300
FirstJobId=$first_job
ReturnToService=2
InactiveLimit=0
KillWait=30
# The node may advertise more CPUs than the machine has (see DIST_CNN_SLURM_CPUS).
SlurmdParameters=config_overrides
NodeName=$name NodeAddr=127.0.0.1 CPUs=$cpus Boards=1 SocketsPerBoard=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$name Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
EOF
}

# ---- daemons -----------------------------------------------------------------

start_munged() {
    pid_of munged >/dev/null && return 0
    mkdir -p "$MUNGE_DIR"
    chmod 0755 "$MUNGE_DIR"
    if [ ! -s "$MUNGE_DIR/munge.key" ]; then
        if command -v mungekey >/dev/null; then
            mungekey --create --keyfile="$MUNGE_DIR/munge.key" --force >/dev/null
        else
            dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1 count=1024 status=none
        fi
    fi
    chmod 0600 "$MUNGE_DIR/munge.key"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    # -F: stay in the foreground (a forking munged leaves a zombie here).
    launch munged munged -F --force \
        --socket="$MUNGE_SOCKET" --key-file="$MUNGE_DIR/munge.key" \
        --pid-file="$MUNGE_DIR/munged.pid" --log-file="$LOG/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed"
    local _
    for _ in $(seq 1 100); do
        if [ -S "$MUNGE_SOCKET" ] && munge -n -S "$MUNGE_SOCKET" 2>/dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1; then
            return 0
        fi
        started munged || break
        sleep 0.1
    done
    log_tail
    die "munged did not come up (socket $MUNGE_SOCKET)"
}

start_slurmctld() {
    pid_of slurmctld >/dev/null && return 0
    launch slurmctld slurmctld -D -c -f "$CONF"
    local _
    for _ in $(seq 1 150); do
        scontrol ping 2>/dev/null | grep -q 'is UP' && return 0
        started slurmctld || break
        sleep 0.2
    done
    log_tail
    die "slurmctld did not come up"
}

start_slurmd() {
    pid_of slurmd >/dev/null && return 0
    launch slurmd slurmd -D -f "$CONF"
}

cmd_start() {
    local b
    for b in munged munge slurmctld slurmd sinfo scontrol squeue; do
        command -v "$b" >/dev/null || die "$b not found: SLURM/munge not installed; run tests/slurm/install.sh"
    done
    [ "$(id -u)" -eq 0 ] || die "must run as root (SlurmUser=root)"
    local t0=$SECONDS
    if all_running && scontrol ping 2>/dev/null | grep -q 'is UP'; then
        wait_idle
        echo "already running (SLURM_CONF=$CONF)"
        return 0
    fi
    if any_running; then
        log "partially running; restarting"
        stop_daemons
    fi
    mkdir -p "$D" "$D/ctld" "$D/spool" "$RUN" "$LOG"
    chmod 0755 "$D"
    ensure_hostname_resolves
    write_conf
    start_munged
    start_slurmctld
    start_slurmd
    wait_idle
    echo "started in $((SECONDS - t0))s (SLURM_CONF=$CONF)"
}

stop_daemons() {
    stop_daemon slurmd
    stop_daemon slurmctld
    stop_daemon munged
}

cmd_stop() {
    if pid_of slurmctld >/dev/null && pid_of slurmd >/dev/null && pid_of munged >/dev/null; then
        # Cancel remaining jobs so that no job processes outlive the cluster.
        local jobs
        jobs=$(squeue -h -o '%i' 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            log "cancelling jobs: $(tr '\n' ' ' <<<"$jobs")"
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            # KillWait is 30 s: TERM, then KILL after 30 s.
            for _ in $(seq 1 200); do
                [ -z "$(squeue -h -o '%i' 2>/dev/null || true)" ] && break
                sleep 0.25
            done
        fi
    fi
    stop_daemons
    echo "stopped"
}

cmd_status() {
    local n pid rc=0
    for n in munged slurmctld slurmd; do
        if pid=$(pid_of "$n"); then echo "$n: running (pid $pid)"; else echo "$n: not running"; rc=1; fi
    done
    if [ $rc = 0 ]; then
        sinfo || rc=1
        squeue || rc=1
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
    stop)   if [ -d "$D" ]; then with_lock cmd_stop; else echo "stopped"; fi ;;
    status) cmd_status ;;
    env)    echo "export SLURM_CONF=$CONF"; echo "export DIST_CNN_SLURM_DIR=$D" ;;
    *)      echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
