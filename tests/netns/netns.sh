#!/usr/bin/env bash
# Several "nodes" on one machine, each with its own IP address and host name, for the multi-node
# tests: one Linux network namespace per node, joined by a bridge that lives in a namespace of its
# own. Every address exists only inside these namespaces, so no traffic can leave them, and the
# machine's own network (its namespace, interfaces, routes, /etc/hosts) is never touched.
#
#   tests/netns/netns.sh up NAME [NODES]     # namespaces NAME-1..NAME-NODES (default 2) + NAME-hub
#   tests/netns/netns.sh exec NAME I CMD...  # run CMD on node I (exec: it becomes that process)
#   tests/netns/netns.sh pids NAME I         # PIDs of the processes on node I, one a line
#   tests/netns/netns.sh kill NAME I [SIG]   # send SIG (default KILL) to every process on node I
#   tests/netns/netns.sh link NAME I up|down # plug node I's cable in or pull it out (its processes live on)
#   tests/netns/netns.sh down NAME           # kill what still runs on the nodes, delete them (idempotent)
#   tests/netns/netns.sh list                # namespaces made by this script (any NAME)
#
# Node I has address $SUBNET.I/24 on its eth0 (SUBNET: DIST_CNN_NETNS_SUBNET, default 10.77.0) and
# host name nI: `exec` runs CMD in UTS and mount namespaces of its own, with that host name and
# /etc/netns/NAME-I/hosts (localhost and every node's name and address; `ip netns exec` uses it too)
# as /etc/hosts, so the nodes find each other by name as on a real cluster. NAME: letters, digits, '_' (it prefixes
# the namespace names; use one per test run). Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN).
set -euo pipefail

SUBNET="${DIST_CNN_NETNS_SUBNET:-10.77.0}"
MARK="dist_cnn netns"   # first line of every hosts file written here: what `list` and `down` look for

die() { echo "netns.sh: $*" >&2; exit 1; }

check_name() {
    [[ "$1" =~ ^[A-Za-z0-9_]{1,40}$ ]] || die "bad NAME '$1' (letters, digits and '_', at most 40)"
}

node_ns() { echo "$1-$2"; }

nodes_of() {   # the node numbers of NAME that exist, one a line
    ip netns list 2>/dev/null | awk '{print $1}' | sed -n "s/^$1-\([0-9][0-9]*\)\$/\1/p" | sort -n
}

hosts_file() {   # hosts_file NODES: /etc/hosts as every node sees it
    local i
    echo "# $MARK"
    echo "127.0.0.1 localhost"
    echo "::1 localhost ip6-localhost ip6-loopback"
    for i in $(seq 1 "$1"); do echo "$SUBNET.$i n$i"; done
}

cmd_up() {
    local name=$1 n=${2:-2} hub i ns
    check_name "$name"
    [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 200 ] || die "bad NODES '$n'"
    [ -z "$(nodes_of "$name")" ] || die "namespaces $name-* exist already (netns.sh down $name)"
    hub=$(node_ns "$name" hub)
    # On any failure, leave nothing half-made behind.
    trap 'cmd_down "$name" >/dev/null 2>&1 || true' ERR
    ip netns add "$hub"
    ip -n "$hub" link add br0 type bridge
    ip -n "$hub" link set br0 up
    for i in $(seq 1 "$n"); do
        ns=$(node_ns "$name" "$i")
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        ip -n "$ns" link add eth0 type veth peer name "p$i" netns "$hub"
        ip -n "$hub" link set "p$i" master br0
        ip -n "$hub" link set "p$i" up
        ip -n "$ns" addr add "$SUBNET.$i/24" dev eth0
        ip -n "$ns" link set eth0 up
        mkdir -p "/etc/netns/$ns"
        hosts_file "$n" >"/etc/netns/$ns/hosts"
    done
    trap - ERR
    echo "up: $n nodes $name-1..$name-$n, $SUBNET.1-$n, host names n1..n$n"
}

cmd_exec() {
    local name=$1 i=$2; shift 2
    check_name "$name"
    [ $# -gt 0 ] || die "exec NAME I CMD...: no CMD"
    local ns; ns=$(node_ns "$name" "$i")
    [ -e "/run/netns/$ns" ] || die "no namespace $ns (netns.sh up $name)"
    # Not `ip netns exec`: it mounts a fresh /sys, without the cgroup hierarchy slurmd needs. A mount
    # namespace of its own (private: nothing propagates back) shows the node's hosts file as /etc/hosts.
    exec nsenter --net="/run/netns/$ns" unshare --mount --uts --propagation private -- \
        /bin/sh -c 'mount --bind "$1" /etc/hosts && hostname "$0" && shift && exec "$@"' \
        "n$i" "/etc/netns/$ns/hosts" "$@"
}

cmd_pids() {
    check_name "$1"
    ip netns pids "$(node_ns "$1" "$2")" 2>/dev/null || true
}

cmd_kill() {
    local name=$1 i=$2 sig=${3:-KILL} pid
    for pid in $(cmd_pids "$name" "$i"); do kill -s "$sig" "$pid" 2>/dev/null || true; done
}

cmd_link() {
    check_name "$1"
    case "$3" in up|down) ;; *) die "link NAME I up|down, not '$3'" ;; esac
    ip -n "$(node_ns "$1" "$2")" link set eth0 "$3"
}

cmd_down() {
    local name=$1 i ns _
    check_name "$name"
    for i in $(nodes_of "$name"); do
        ns=$(node_ns "$name" "$i")
        # Everything on a node was started through `exec` for this NAME: kill it by PID, and wait
        # until it is gone (a namespace outlives `ip netns del` while a process is still in it).
        for _ in $(seq 1 50); do
            [ -n "$(cmd_pids "$name" "$i")" ] || break
            cmd_kill "$name" "$i" KILL
            sleep 0.1
        done
        ip netns del "$ns" 2>/dev/null || true
        rm -rf "/etc/netns/$ns"
    done
    ip netns del "$(node_ns "$name" hub)" 2>/dev/null || true
    rmdir /etc/netns 2>/dev/null || true   # only when nothing else uses it
    echo "down: $name"
}

cmd_list() {
    local ns
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}'); do
        if [[ "$ns" == *-hub ]] || head -n1 "/etc/netns/$ns/hosts" 2>/dev/null | grep -qF "$MARK"; then
            echo "$ns"
        fi
    done
}

case "${1:-}" in
    up)   [ $# -ge 2 ] || die "usage: up NAME [NODES]"; cmd_up "$2" "${3:-2}" ;;
    exec) [ $# -ge 4 ] || die "usage: exec NAME I CMD..."; shift; cmd_exec "$@" ;;
    pids) [ $# -eq 3 ] || die "usage: pids NAME I"; cmd_pids "$2" "$3" ;;
    kill) [ $# -ge 3 ] || die "usage: kill NAME I [SIG]"; cmd_kill "$2" "$3" "${4:-KILL}" ;;
    link) [ $# -eq 4 ] || die "usage: link NAME I up|down"; cmd_link "$2" "$3" "$4" ;;
    down) [ $# -eq 2 ] || die "usage: down NAME"; cmd_down "$2" ;;
    list) cmd_list ;;
    *)    echo "usage: $0 up NAME [NODES] | exec NAME I CMD... | pids NAME I | kill NAME I [SIG] | link NAME I up|down | down NAME | list" >&2
          exit 2 ;;
esac
