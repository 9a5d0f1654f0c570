#!/usr/bin/env bash
# Two "hosts" on this machine, for the migration tests and benchmark (`crac migrate`).
#
#   scripts/hosts.sh up PREFIX      set up (PREFIX: 1-8 letters/digits, e.g. c22)
#   scripts/hosts.sh down PREFIX    tear down; idempotent, leaves nothing
#   scripts/hosts.sh exec PREFIX a|b|c COMMAND...
#                                   run COMMAND on host A, host B or the client
#   scripts/hosts.sh init PREFIX    host B's init (its pid out here)
#
# Three network namespaces, named PREFIX-a, PREFIX-b and PREFIX-c, and three veth pairs made
# inside them (no interface appears out here):
#
#   A 10.77.0.1/30 ---- the migration link ---- 10.77.0.2/30 B
#   A 10.77.1.2/30 ---- 10.77.1.1/30  client  10.77.2.1/30 ---- 10.77.2.2/30 B
#
# The client namespace holds 10.77.3.1/32 on its loopback (the clients' address, and where
# the cache-server's upstream listens); A and B route to it. The service address, 10.77.9.1/32,
# starts on A's loopback, and the client routes it to A: a migration moves it to B's loopback
# and the route to B (the operator's hook, as a virtual IP moves in a real deployment). These
# addresses exist only inside the namespaces.
#
# Host A is the network namespace alone: a service and CRIU run there through
# `nsenter --net=/run/netns/PREFIX-a` (not `ip netns exec`, whose private mount namespace makes
# CRIU's dump fail: "mount ... has unreachable sharing"). Host B has besides a pid and a mount
# namespace of its own, with its own /proc and an empty /run (but for /run/netns, so that a
# command there can reach the client's namespace), whose pid 1 (a perl loop reaping
# orphans: restored services are re-parented to it) keeps them alive: on one machine a frozen
# source keeps its pids until every page reached B, so B must be able to give the service the
# same pids.
set -euo pipefail

usage() {
    sed -n '2,9p' "$0" >&2
    exit 2
}

[[ $# -ge 2 ]] || usage
verb=$1
prefix=$2
[[ $prefix =~ ^[a-z0-9]{1,8}$ ]] || { echo "hosts.sh: PREFIX must be 1-8 lowercase letters or digits" >&2; exit 2; }
A=$prefix-a
B=$prefix-b
C=$prefix-c

in_ns() {
    local ns=$1
    shift
    nsenter --net="/run/netns/$ns" "$@"
}

# Host B's pid 1, seen from here: the process in B's network namespace that is pid 1 of a pid
# namespace of its own.
init_of_b() {
    local pid
    for pid in $(ip netns pids "$B" 2>/dev/null); do
        if grep -Eq '^NSpid:[[:space:]]+[0-9]+[[:space:]]+1$' "/proc/$pid/status" 2>/dev/null; then
            echo "$pid"
            return 0
        fi
    done
    return 1
}

down() {
    local ns pids tries init
    # B's init first, so that its parent (unshare) reaps it and ends by itself: a killed
    # unshare would leave it a zombie for this machine's init to reap.
    if [[ -e /run/netns/$B ]] && init=$(init_of_b); then
        kill -9 "$init" 2>/dev/null || true
        for tries in $(seq 50); do
            [[ -e /proc/$init ]] || break
            sleep 0.05
        done
    fi
    for ns in "$A" "$B" "$C"; do
        [[ -e /run/netns/$ns ]] || continue
        # Everything still running in the namespace (B's init takes its pid namespace with it).
        for tries in $(seq 50); do
            pids=$(ip netns pids "$ns" 2>/dev/null || true)
            [[ -n $pids ]] || break
            # shellcheck disable=SC2086
            kill -9 $pids 2>/dev/null || true
            sleep 0.1
        done
        ip netns del "$ns"
    done
    # The folder `ip netns add` made, and the mount it put there (a bind of itself, made shared
    # once per boot), if no other namespace is left in it.
    if [[ -d /run/netns && -z $(ls -A /run/netns) ]]; then
        mountpoint -q /run/netns && umount /run/netns 2>/dev/null || true
        rmdir /run/netns 2>/dev/null || true
    fi
}

# What the hosts and crac's migration need: iproute2 (ip), iptables (CRIU's network lock, and
# crac removing what it leaves), util-linux (nsenter, unshare) and perl (B's init).
require_tools() {
    local missing=()
    command -v ip >/dev/null || missing+=(iproute2)
    command -v iptables >/dev/null || missing+=(iptables)
    command -v nsenter >/dev/null || missing+=(util-linux)
    command -v perl >/dev/null || missing+=(perl-base)
    ((${#missing[@]} == 0)) && return 0
    echo "hosts.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y "${missing[@]}" >/dev/null 2>&1 || {
        apt-get update >/dev/null
        apt-get install -y "${missing[@]}" >/dev/null
    }
}

up() {
    require_tools
    down
    trap 'down' ERR
    ip netns add "$A"
    ip netns add "$B"
    ip netns add "$C"
    ip link add "$prefix-ab" netns "$A" type veth peer name "$prefix-ba" netns "$B"
    ip link add "$prefix-ac" netns "$A" type veth peer name "$prefix-ca" netns "$C"
    ip link add "$prefix-bc" netns "$B" type veth peer name "$prefix-cb" netns "$C"
    ip -n "$A" addr add 10.77.0.1/30 dev "$prefix-ab"
    ip -n "$B" addr add 10.77.0.2/30 dev "$prefix-ba"
    ip -n "$A" addr add 10.77.1.2/30 dev "$prefix-ac"
    ip -n "$C" addr add 10.77.1.1/30 dev "$prefix-ca"
    ip -n "$B" addr add 10.77.2.2/30 dev "$prefix-bc"
    ip -n "$C" addr add 10.77.2.1/30 dev "$prefix-cb"
    ip -n "$C" addr add 10.77.3.1/32 dev lo
    ip -n "$A" addr add 10.77.9.1/32 dev lo
    for ns in "$A" "$B" "$C"; do
        ip -n "$ns" link set lo up
    done
    ip -n "$A" link set "$prefix-ab" up
    ip -n "$A" link set "$prefix-ac" up
    ip -n "$B" link set "$prefix-ba" up
    ip -n "$B" link set "$prefix-bc" up
    ip -n "$C" link set "$prefix-ca" up
    ip -n "$C" link set "$prefix-cb" up
    ip -n "$A" route add default via 10.77.1.1
    ip -n "$B" route add default via 10.77.2.1
    ip -n "$C" route add 10.77.9.1/32 via 10.77.1.2
    # Host B's pid and mount namespaces, kept by their init.
    in_ns "$B" setsid unshare --pid --fork --mount --propagation private --mount-proc \
        sh -c 'exec 3</run/netns && mount -t tmpfs -o mode=0755 tmpfs /run && mkdir /run/netns && mount --no-canonicalize --rbind /proc/self/fd/3 /run/netns && exec 3<&- && exec perl -e '\''$0 = "host-b-init"; while (1) { sleep 1 if wait() == -1 }'\' \
        </dev/null >/dev/null 2>&1 &
    local tries
    for tries in $(seq 100); do
        init_of_b >/dev/null && break
        sleep 0.05
    done
    init_of_b >/dev/null || { echo "hosts.sh: host B's init did not start" >&2; exit 1; }
    trap - ERR
}

case $verb in
    up) up ;;
    down) down ;;
    init) init_of_b || { echo "hosts.sh: no host B for $prefix (run: hosts.sh up $prefix)" >&2; exit 1; } ;;
    exec)
        [[ $# -ge 4 ]] || usage
        host=$3
        shift 3
        case $host in
            a) exec nsenter --net="/run/netns/$A" "$@" ;;
            c) exec nsenter --net="/run/netns/$C" "$@" ;;
            b)
                init=$(init_of_b) || { echo "hosts.sh: no host B for $prefix" >&2; exit 1; }
                exec nsenter --target "$init" --net --pid --mount "$@" ;;
            *) usage ;;
        esac ;;
    *) usage ;;
esac
