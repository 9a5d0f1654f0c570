#!/usr/bin/env bash
# Zero-downtime upgrades with crac-rs: the `upgradable` example (an HTTP service whose answers
# name its version and count every request across versions) is upgraded under a running load,
# three ways, with `crac upgrade`:
#   a) handoff: v2 (another build) starts with v1's listening socket (LISTEN_FDS), says
#      READY=1, and v1 retires: it flushes its count, finishes its requests and exits; v2 reads
#      the count back. The load's clients count refused connections and failed requests.
#   b) rollback: a v3 that exits right after READY=1 is killed, and v2 serves on.
#   c) state: the same executable is checkpointed and restored with APP_VERSION=v3, which its
#      after_restore hook reads: same pid, count kept in memory.
#
# Usage: sudo scripts/upgrade-demo.sh      (root: the state level runs CRIU; any directory)
#   UPGRADE_DEMO_PORT  the service's port (default 17090)
#   UPGRADE_DEMO_KEEP=1  keep the temporary folder (store, logs) instead of deleting it
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DEMO_NAME=upgrade-demo
# shellcheck source=scripts/demo-lib.sh
source "$ROOT/scripts/demo-lib.sh"

PORT=${UPGRADE_DEMO_PORT:-17090}
((EUID == 0)) || die "run me as root (the state level runs CRIU): sudo $0"
[[ $PORT =~ ^[0-9]+$ ]] || die "UPGRADE_DEMO_PORT must be a number"
command -v cargo >/dev/null ||
    die "cargo not found in PATH (under sudo, try: sudo env \"PATH=\$PATH\" $0)"
port_open "$PORT" && die "port $PORT is taken: choose another with UPGRADE_DEMO_PORT"

WORK=$(mktemp -d /tmp/crac-upgrade-demo.XXXXXX)
LOAD_PIDS=()
cleanup() {
    local code=$?
    trap - ERR
    for pid in "${LOAD_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    # Whatever version serves now: the one on the port.
    for pid in $(pgrep -f "$WORK/upgradable" || true) $(pgrep -xf "$ROOT/target/debug/upgradable" || true); do
        kill "$pid" 2>/dev/null || true
    done
    if [[ ${UPGRADE_DEMO_KEEP:-} == 1 ]]; then
        say "kept $WORK"
    else
        rm -rf "$WORK"
    fi
    exit "$code"
}
trap cleanup EXIT

CRAC="$ROOT/target/debug/crac"
APP="$ROOT/target/debug/upgradable"

ask() { curl -fsS --max-time 5 "http://127.0.0.1:$PORT/"; }

# A load: 4 clients in a loop, one connection per request; each line of $WORK/load.N is an
# answer or "FAILED".
start_load() {
    for n in 1 2 3 4; do
        (while :; do curl -sS --max-time 5 "http://127.0.0.1:$PORT/" 2>&1 || echo FAILED; sleep 0.01; done) \
            >>"$WORK/load.$n" &
        LOAD_PIDS+=($!)
    done
}
stop_load() {
    for pid in "${LOAD_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait "${LOAD_PIDS[@]}" 2>/dev/null || true
    LOAD_PIDS=()
    local answers failed
    answers=$(cat "$WORK"/load.* | grep -c hits= || true)
    failed=$(cat "$WORK"/load.* | grep -c FAILED || true)
    # What curl said of each failure.
    grep -h -B1 FAILED "$WORK"/load.* | grep -v FAILED | sort | uniq -c | indent || true
    say "the load: $answers answers, $failed failed or refused"
    ((failed == 0)) || die "$failed requests failed during $1"
    rm -f "$WORK"/load.*
}

step "Provisioning CRIU >= 4.2 (scripts/provision-criu.sh; a no-op when it is already there)"
bash scripts/provision-criu.sh 2>&1 | indent || die "provisioning CRIU failed (see above)"

step "Building the workspace (cargo build --workspace)"
cargo build --workspace 2>&1 | tail -n 3 | indent || die "cargo build failed (see above)"

step "Starting v1 on port $PORT"
(cd "$WORK" && PORT=$PORT STATE_FILE=$WORK/state setsid "$APP" </dev/null >>"$WORK/v1.log" 2>&1 &)
for _ in $(seq 100); do port_open "$PORT" && break; sleep 0.05; done
V1=$(pgrep -nxf "$APP")
for _ in 1 2 3; do ask | indent; done

step "Handoff: v2, another build, takes v1's listener while 4 clients keep asking"
cp "$APP" "$WORK/upgradable"
start_load
sleep 0.5
"$CRAC" --store "$WORK/store" upgrade "$V1" --env APP_VERSION=v2 --log "$WORK/v2.log" \
    -- "$WORK/upgradable" 2>&1 | indent
sleep 0.5
stop_load "the handoff"
ask | indent
ask | grep -q '^v2 ' || die "v2 does not answer"
V2=$(pgrep -nf "$WORK/upgradable")

step "Rollback: a v3 that exits right after READY=1 is killed; v2 serves on"
start_load
code=0
"$CRAC" --store "$WORK/store" upgrade "$V2" --level handoff --env APP_VERSION=v3 \
    --env CRASH=after-ready --settle 1 --log "$WORK/v3.log" -- "$WORK/upgradable" \
    >"$WORK/rollback.out" 2>&1 || code=$?
indent <"$WORK/rollback.out"
sleep 0.5
stop_load "the rollback"
say "crac upgrade exited with $code (1: the new version failed, the old one serves on)"
((code == 1)) || die "expected exit code 1"
ask | indent
ask | grep -q '^v2 ' || die "v2 does not answer any more"

step "State: the same executable checkpointed and restored with APP_VERSION=v3 (same pid, count in memory)"
"$CRAC" --store "$WORK/store" upgrade "$V2" --env APP_VERSION=v3 -- "$WORK/upgradable" 2>&1 | indent
ask | indent
ask | grep -q "^v3 .* pid=$V2\$" || die "v3 does not answer as pid $V2"

step "Done"
say "v1 -> v2 (handoff) -> v3 rolled back -> v3 (state): no request failed"
