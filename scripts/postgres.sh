#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the pg-service example, its demo and its end-to-end test:
# Debian's PostgreSQL server, a cluster in a folder of the caller's, on a loopback port, with
# its Unix socket in that folder too. Nothing system-wide is started or configured.
#
# Usage:
#   scripts/postgres.sh install          install Debian's PostgreSQL server if missing (root)
#   scripts/postgres.sh start DIR PORT   initdb DIR, start it on 127.0.0.1:PORT, print its URL
#   scripts/postgres.sh stop DIR         stop the cluster in DIR and remove DIR
#
# As root, the server runs as the `postgres` user the package creates (PostgreSQL refuses
# to run as root); DIR is handed to that user.
set -euo pipefail

info() { printf 'postgres: %s\n' "$*" >&2; }
die() {
    printf 'postgres: error: %s\n' "$*" >&2
    exit 1
}

# The newest installed server's bin folder (Debian keeps them per major version).
bindir() {
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [[ -n $dir && -x $dir/initdb && -x $dir/pg_ctl ]] || return 1
    printf '%s\n' "$dir"
}

# Runs a server command as the user that owns the cluster.
as_owner() {
    if ((EUID == 0)); then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

install() {
    if dir=$(bindir); then
        info "$("$dir/postgres" --version) is installed; nothing to do."
        return
    fi
    ((EUID == 0)) || die "must run as root to install PostgreSQL (apt-get install postgresql)"
    command -v apt-get >/dev/null || die "apt-get not found: install PostgreSQL's server with this system's package manager"
    export DEBIAN_FRONTEND=noninteractive
    info "installing PostgreSQL from Debian's packages"
    # Installing the package creates and starts a system cluster through its maintainer
    # scripts; policy-rc.d keeps it from starting, and it is dropped again afterwards so the
    # machine runs no server it did not run before.
    local policy=/usr/sbin/policy-rc.d had_policy=0
    [[ -e $policy ]] && had_policy=1
    ((had_policy)) || { printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy"; }
    local ok=0
    if apt-get install -y -q --no-install-recommends postgresql >/dev/null 2>&1; then
        ok=1
    elif apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends postgresql >/dev/null; then
        ok=1
    fi
    ((had_policy)) || rm -f "$policy"
    ((ok)) || die "apt-get install postgresql failed"
    dir=$(bindir) || die "installed postgresql, but found no server under /usr/lib/postgresql/*/bin"
    info "installed $("$dir/postgres" --version)"
}

start() {
    local data=${1:?usage: postgres.sh start DIR PORT} port=${2:?usage: postgres.sh start DIR PORT}
    local dir
    dir=$(bindir) || die "no PostgreSQL server installed: run scripts/postgres.sh install (as root)"
    [[ $port =~ ^[0-9]+$ ]] || die "PORT must be a number, not '$port'"
    [[ ! -e $data/PG_VERSION ]] || die "$data already holds a cluster: stop it first (scripts/postgres.sh stop $data)"
    mkdir -p "$data"
    ((EUID == 0)) && chown postgres: "$data"
    as_owner "$dir/initdb" -D "$data" -U postgres -A trust --no-sync >"$data.initdb.log" 2>&1 ||
        die "initdb failed: $(tail -n 5 "$data.initdb.log")"
    rm -f "$data.initdb.log"
    as_owner "$dir/pg_ctl" -D "$data" -l "$data/server.log" -w -t 30 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $data -c fsync=off" start >/dev/null ||
        die "the server did not start: $(tail -n 5 "$data/server.log")"
    printf 'postgres://postgres@127.0.0.1:%s/postgres\n' "$port"
}

stop() {
    local data=${1:?usage: postgres.sh stop DIR}
    local dir
    if [[ -e $data/postmaster.pid ]] && dir=$(bindir); then
        as_owner "$dir/pg_ctl" -D "$data" -m fast -w -t 30 stop >/dev/null ||
            die "pg_ctl stop failed for $data; see $data/server.log"
    fi
    rm -rf "$data"
}

case ${1:-} in
    install) install ;;
    start) start "${@:2}" ;;
    stop) stop "${@:2}" ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" ;;
    *) die "unknown command '${1:-}' (try --help)" ;;
esac
