#!/usr/bin/env bash
# The async demo: pg-service (axum + a PostgreSQL pool, examples/pg_service.rs) writes rows,
# is checkpointed with `crac checkpoint` (its pool closed first: PostgreSQL sees none of its
# connections while it is an image), and restored with `crac restore`: it reads the rows it
# wrote, with a new pool and a new instance id.
#
# Usage: sudo scripts/pg-demo.sh     (root: CRIU needs it; runs from any directory)
#   It provisions CRIU (scripts/provision-criu.sh), installs PostgreSQL from Debian's packages
#   if missing (scripts/postgres.sh install), builds the workspace, starts a throwaway cluster
#   in a temporary folder, and removes everything it started when it ends.
#
#   DEMO_PG_PORT       the cluster's port (default 55432)
#   DEMO_SERVICE_PORT  pg-service's port (default 17080)
#   DEMO_KEEP=1        keep the temporary folder (logs, images) instead of deleting it
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DEMO_NAME=pg-demo
# shellcheck source=scripts/demo-lib.sh
source "$ROOT/scripts/demo-lib.sh"

PG_PORT=${DEMO_PG_PORT:-55432}
PORT=${DEMO_SERVICE_PORT:-17080}

((EUID == 0)) || die "run me as root (CRIU needs root to dump and restore): sudo $0"
[[ $PG_PORT =~ ^[0-9]+$ && $PORT =~ ^[0-9]+$ ]] || die "DEMO_PG_PORT and DEMO_SERVICE_PORT must be numbers"
command -v cargo >/dev/null || die "cargo not found in PATH (under sudo, try: sudo env \"PATH=\$PATH\" $0)"
for p in "$PG_PORT" "$PORT"; do
    ! port_open "$p" || die "port $p is already in use; pick others with DEMO_PG_PORT / DEMO_SERVICE_PORT"
done

WORK=''
SERVICE_PID=''
cleanup() {
    local rc=$?
    trap - ERR
    set +e
    if ((rc != 0)) && [[ -n $WORK && -f $WORK/service.log ]]; then
        printf '\n--- service.log (last 40 lines) ---\n' >&2
        tail -n 40 "$WORK/service.log" >&2
    fi
    if [[ -n $WORK ]]; then step "Cleaning up"; fi
    if [[ -n $SERVICE_PID ]] && alive "$SERVICE_PID" &&
        [[ $(readlink "/proc/$SERVICE_PID/exe") == "$BIN/pg-service" ]]; then
        kill -TERM "$SERVICE_PID" && say "stopped pg-service (pid $SERVICE_PID)"
    fi
    if [[ -n $WORK && -d $WORK ]]; then
        scripts/postgres.sh stop "$WORK/pg" && say "stopped and removed the PostgreSQL cluster"
        if [[ ${DEMO_KEEP:-0} == 1 ]]; then say "kept $WORK"; else rm -rf "$WORK" && say "removed $WORK"; fi
    fi
    ((rc == 0)) && printf '\n%spg-demo: OK%s\n' "$GREEN" "$OFF"
    exit "$rc"
}
trap cleanup EXIT

# One HTTP request with bash's /dev/tcp; prints the body.
http() { # http METHOD PATH [BODY]
    local fd body=${3:-} reply
    { exec {fd}<>"/dev/tcp/127.0.0.1/$PORT"; } 2>/dev/null || return 1
    printf '%s %s HTTP/1.1\r\nhost: demo\r\nconnection: close\r\ncontent-length: %d\r\n\r\n%s' \
        "$1" "$2" "${#body}" "$body" >&"$fd"
    reply=$(timeout 10 cat <&"$fd") || true
    exec {fd}>&-
    [[ $reply == "HTTP/1.1 200"* ]] || { printf '%s\n' "$reply" >&2; return 1; }
    printf '%s\n' "${reply##*$'\r\n\r\n'}"
}
psql_count() {
    psql -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -Atc \
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'crac-pg-service'"
}

step "Provisioning CRIU and PostgreSQL (no-ops when they are there)"
bash scripts/provision-criu.sh 2>&1 | indent || die "provisioning CRIU failed (see above)"
scripts/postgres.sh install 2>&1 | indent || die "installing PostgreSQL failed (see above)"

step "Building the workspace (cargo build --workspace)"
cargo build --workspace 2>&1 | tail -n 3 | indent || die "cargo build failed (see above)"
TARGET_DIR=${CARGO_TARGET_DIR:-target}
[[ $TARGET_DIR == /* ]] || TARGET_DIR=$ROOT/$TARGET_DIR
BIN=$TARGET_DIR/debug
crac() { "$BIN/crac" --store "$WORK/images" "$@"; }

step "Starting a throwaway PostgreSQL cluster on 127.0.0.1:$PG_PORT"
WORK=$(mktemp -d /tmp/crac-pg-demo.XXXXXX)
chmod 755 "$WORK"
URL=$(scripts/postgres.sh start "$WORK/pg" "$PG_PORT")
say "$URL (in $WORK/pg)"

step "Starting pg-service on 127.0.0.1:$PORT"
# setsid and no terminal: CRIU dumps a session leader; >> so the restored process can append.
setsid "$BIN/pg-service" --port "$PORT" --database "$URL" </dev/null >>"$WORK/service.log" 2>&1 &
SERVICE_PID=$!
for ((i = 0; i < 100; i++)); do
    port_open "$PORT" && break
    alive "$SERVICE_PID" || die "pg-service exited: $(cat "$WORK/service.log")"
    sleep 0.1
done
say "pid $SERVICE_PID; $(http GET /instance)"

step "Writing three notes"
for n in one two three; do say "$(http POST /notes "note $n")"; done
say "PostgreSQL sees $(psql_count) connection(s) of the service"

step "Checkpointing it: crac checkpoint $SERVICE_PID --name pg"
crac checkpoint "$SERVICE_PID" --name pg | indent
{ wait "$SERVICE_PID"; } 2>/dev/null || true # reap it: a zombie would hold its pid
count=$(psql_count)
say "PostgreSQL sees $count connection(s) of the service while it is an image"
[[ $count == 0 ]] || die "the pool was not closed before the dump"

step "Restoring it: crac restore pg --detach"
crac restore pg --detach | indent
say "$(http GET /instance)   (a new instance id, generation 1)"
say "notes: $(http GET /notes)"
say "PostgreSQL sees $(psql_count) connection(s) of the service again"
say "its log, hooks and all:"
indent <"$WORK/service.log"
