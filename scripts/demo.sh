#!/usr/bin/env bash
# The crac-rs demo: a cache server with a warm cache is checkpointed with CRIU, killed, and
# restored; it comes back with every cache entry, a fresh connection to its upstream, and
# generation 1 -- and the hooks that made that possible ran in a visible order.
#
# Usage: sudo scripts/demo.sh        (root: CRIU needs it; runs from any directory)
#   It provisions CRIU >= 4.2 (scripts/provision-criu.sh), builds the workspace, starts
#   `upstream` (a slow "database") and `cache-server` (examples/), warms the cache, dumps the
#   server with `criu dump --action-script crac-action`, restores it with `criu restore -d`,
#   checks what came back, and cleans up everything it started.
#
#   DEMO_CACHE_PORT     cache-server's port (default 17070)
#   DEMO_UPSTREAM_PORT  upstream's port (default 17071)
#   DEMO_KEYS           how many keys to warm the cache with (default 40)
#   DEMO_KEEP=1         keep the temporary folder (logs, images) instead of deleting it
#   CRAC_CRIU           a CRIU >= 4.2 to use instead of the provisioned one
#   CRAC_CRIU_PREFIX    where provision-criu.sh installs CRIU (default /opt/crac-criu)
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DEMO_NAME=demo
# shellcheck source=scripts/demo-lib.sh
source "$ROOT/scripts/demo-lib.sh"

CACHE_PORT=${DEMO_CACHE_PORT:-17070}
UPSTREAM_PORT=${DEMO_UPSTREAM_PORT:-17071}
KEYS=${DEMO_KEYS:-40}


# --- Preconditions ---------------------------------------------------------------------------

((EUID == 0)) || die "run me as root (CRIU needs root to dump and restore): sudo $0"
[[ $CACHE_PORT =~ ^[0-9]+$ && $UPSTREAM_PORT =~ ^[0-9]+$ && $KEYS =~ ^[0-9]+$ ]] ||
    die "DEMO_CACHE_PORT, DEMO_UPSTREAM_PORT and DEMO_KEYS must be numbers"
((KEYS > 0)) || die "DEMO_KEYS must be at least 1"
command -v cargo >/dev/null ||
    die "cargo not found in PATH (under sudo, try: sudo env \"PATH=\$PATH\" $0)"

# --- Helpers ---------------------------------------------------------------------------------

now_us() { echo "${EPOCHREALTIME//[.,]/}"; }
fmt_ms() { printf '%d.%d ms' $(($1 / 1000)) $((($1 % 1000) / 100)); }

# One request to the cache server; prints the one-line reply. Fails if there is none.
ask() {
    local fd reply
    { exec {fd}<>"/dev/tcp/127.0.0.1/$CACHE_PORT"; } 2>/dev/null || return 1
    if ! printf '%s\n' "$1" >&"$fd" || ! IFS= read -r -t 5 reply <&"$fd"; then
        exec {fd}>&-
        return 1
    fi
    exec {fd}>&-
    printf '%s\n' "$reply"
}



# --- Cleanup: everything this script started, by pid, and the temporary folder ---------------

WORK=''
UPSTREAM_PID=''
SERVER_PID=''
SERVER_BIN=''

stop_pid() { # stop_pid PID NAME EXE: SIGTERM, then SIGKILL; only if it still runs EXE
    local pid=$1 name=$2 exe=$3 i
    alive "$pid" || return 0
    if [[ $(readlink "/proc/$pid/exe" 2>/dev/null) != "$exe" ]]; then
        say "not stopping pid $pid: it is no longer $name"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    wait "$pid" 2>/dev/null || true # reaps it if it is still our child
    say "stopped $name (pid $pid)"
}

cleanup() {
    local rc=$?
    trap - ERR
    set +e
    if ((rc != 0)) && [[ -n $WORK && -d $WORK ]]; then
        printf '\n--- logs, for diagnosis ---\n' >&2
        for f in "$WORK"/*.log "$WORK"/images/*.log; do
            [[ -s $f ]] || continue
            printf '\n--- %s (last 40 lines) ---\n' "$f" >&2
            tail -n 40 "$f" >&2
        done
    fi
    if [[ -n $SERVER_PID || -n $UPSTREAM_PID ]]; then step "Cleaning up"; fi
    [[ -n $SERVER_PID ]] && stop_pid "$SERVER_PID" cache-server "$SERVER_BIN"
    [[ -n $UPSTREAM_PID ]] && stop_pid "$UPSTREAM_PID" upstream "$BIN/upstream"
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ ${DEMO_KEEP:-0} == 1 ]]; then
            say "kept $WORK (logs and images)"
        else
            rm -rf "$WORK" && say "removed $WORK"
        fi
    fi
    if ((rc == 0)); then
        printf '\n%sdemo: OK%s\n' "$GREEN" "$OFF"
    fi
    exit "$rc"
}
trap cleanup EXIT

# --- 1. CRIU ---------------------------------------------------------------------------------

step "Provisioning CRIU >= 4.2 (scripts/provision-criu.sh; a no-op when it is already there)"
bash scripts/provision-criu.sh 2>&1 | indent || die "provisioning CRIU failed (see above)"
CRIU=${CRAC_CRIU_PREFIX:-/opt/crac-criu}/bin/criu
if [[ -n ${CRAC_CRIU:-} ]] && "$CRAC_CRIU" --version >/dev/null 2>&1; then CRIU=$CRAC_CRIU; fi
criu_version=$("$CRIU" --version 2>/dev/null | sed -n 's/^Version: *//p') ||
    die "$CRIU does not run"
[[ -n $criu_version ]] || die "$CRIU does not report a version"
say "using $CRIU (CRIU $criu_version)"

# --- 2. Build --------------------------------------------------------------------------------

step "Building the workspace (cargo build --workspace)"
cargo build --workspace 2>&1 | indent || die "cargo build failed (see above)"
TARGET_DIR=${CARGO_TARGET_DIR:-target}
[[ $TARGET_DIR == /* ]] || TARGET_DIR=$ROOT/$TARGET_DIR
BIN=$TARGET_DIR/debug
ACTION=$BIN/crac-action
SERVER_BIN=$BIN/cache-server
for b in "$ACTION" "$SERVER_BIN" "$BIN/upstream"; do
    [[ -x $b ]] || die "$b was not built (is CARGO_TARGET_DIR or build.target-dir set elsewhere?)"
done
say "action script: $ACTION"

# --- 3. Start upstream and the cache server --------------------------------------------------

step "Starting upstream (a slow 'database') and cache-server"
for p in "$CACHE_PORT" "$UPSTREAM_PORT"; do
    ! port_open "$p" || die "port $p is already in use; pick others with DEMO_CACHE_PORT / DEMO_UPSTREAM_PORT"
done
WORK=$(mktemp -d /tmp/crac-demo.XXXXXX)
IMG=$WORK/images
mkdir -p "$IMG"
say "working folder: $WORK"

# setsid: CRIU dumps a tree whose root leads its own session; stdio to files: it must not be a
# terminal; appended to (>>): a log opened with > makes an image that cannot be restored once
# the log has grown (CRIU: "has bad size"). (upstream is not dumped; it gets the same treatment.)
setsid "$BIN/upstream" "$UPSTREAM_PORT" </dev/null >>"$WORK/upstream.log" 2>&1 &
UPSTREAM_PID=$!
for ((i = 0; i < 100; i++)); do
    grep -q 'listening on' "$WORK/upstream.log" && break
    alive "$UPSTREAM_PID" || die "upstream exited: $(cat "$WORK/upstream.log")"
    sleep 0.05
done
grep -q 'listening on' "$WORK/upstream.log" || die "upstream did not start listening within 5 s"
say "upstream:     pid $UPSTREAM_PID on 127.0.0.1:$UPSTREAM_PORT (log: upstream.log)"

setsid "$SERVER_BIN" --port "$CACHE_PORT" --upstream "127.0.0.1:$UPSTREAM_PORT" \
    </dev/null >>"$WORK/server.log" 2>&1 &
SERVER_PID=$!
stats=''
for ((i = 0; i < 100; i++)); do
    stats=$(ask STATS) && break
    alive "$SERVER_PID" || die "cache-server exited: $(cat "$WORK/server.log")"
    sleep 0.05
done
[[ -n $stats ]] || die "cache-server did not answer STATS within 5 s"
expect_field "$stats" pid "$SERVER_PID"
say "cache-server: pid $SERVER_PID on 127.0.0.1:$CACHE_PORT (log: server.log); it says:"
indent <"$WORK/server.log"

# --- 4. Warm the cache -----------------------------------------------------------------------

step "Warming the cache: GET key-1 .. key-$KEYS twice (misses go to upstream, then hits)"
t0=$(now_us)
for ((i = 1; i <= KEYS; i++)); do
    v=$(ask "GET key-$i") || die "GET key-$i: no reply"
    [[ $v == "value-of-key-$i" ]] || die "GET key-$i: unexpected reply '$v'"
done
t1=$(now_us)
for ((i = 1; i <= KEYS; i++)); do
    v=$(ask "GET key-$i") || die "GET key-$i: no reply"
    [[ $v == "value-of-key-$i" ]] || die "GET key-$i: unexpected reply '$v'"
done
t2=$(now_us)
say "$KEYS misses (through upstream): $(fmt_ms $((t1 - t0))) in all, $(fmt_ms $(((t1 - t0) / KEYS))) each"
say "$KEYS hits   (from the cache):   $(fmt_ms $((t2 - t1))) in all, $(fmt_ms $(((t2 - t1) / KEYS))) each"
before=$(ask STATS) || die "STATS: no reply"
say "STATS: $before"
expect_field "$before" entries "$KEYS"
expect_field "$before" upstream_connection 1
expect_field "$before" generation 0
entries=$(field "$before" entries)
hits=$(field "$before" hits)
misses=$(field "$before" misses)

# --- 5. Checkpoint ---------------------------------------------------------------------------

step "Checkpointing pid $SERVER_PID with CRIU (the process is dumped, then killed)"
say "$ criu dump -t $SERVER_PID -D $IMG --skip-in-flight --action-script $ACTION -o dump.log"
t0=$(now_us)
dump_ok=1
# The braces catch bash's own "Killed" notice about its background job, which would otherwise
# land in the middle of the output.
{
    "$CRIU" dump -t "$SERVER_PID" -D "$IMG" --skip-in-flight --action-script "$ACTION" -o dump.log 2>&1 | indent ||
        dump_ok=0
    t1=$(now_us)
    rc=0
    if ((dump_ok)); then wait "$SERVER_PID" || rc=$?; fi
} 2>>"$WORK/bash-notices.log"
((dump_ok)) || die "criu dump failed; see $IMG/dump.log below"
say "dump took $(fmt_ms $((t1 - t0))) (hooks included); image: $(du -sh "$IMG" | cut -f1) in $IMG"
say "the hooks that ran before the dump (server.log):"
grep 'before_checkpoint' "$WORK/server.log" | indent
say "crac-action's lines in CRIU's log (images/dump.log):"
grep 'crac-action' "$IMG/dump.log" | indent

step "The process is gone"
if ((rc > 128)); then
    say "pid $SERVER_PID ended: killed by signal $((rc - 128)) ($(kill -l $((rc - 128)))), as criu dump does"
else
    say "pid $SERVER_PID ended with exit code $rc"
fi
! alive "$SERVER_PID" || die "pid $SERVER_PID still runs after the dump"
[[ ! -e /proc/$SERVER_PID ]] || die "pid $SERVER_PID was not reaped"
say "pid $SERVER_PID: no such process (reaped; its pid is free for the restore)"
if port_open "$CACHE_PORT"; then die "something still answers on port $CACHE_PORT"; fi
say "port $CACHE_PORT: connection refused"
say "upstream saw its connection close (upstream.log):"
grep 'ended after' "$WORK/upstream.log" | indent

# --- 6. Restore ------------------------------------------------------------------------------

step "Restoring from $IMG"
say "$ criu restore -d -D $IMG --action-script $ACTION -o restore.log"
t0=$(now_us)
if ! "$CRIU" restore -d -D "$IMG" --action-script "$ACTION" -o restore.log 2>&1 | indent; then
    die "criu restore failed; see $IMG/restore.log below"
fi
t1=$(now_us)
say "restore took $(fmt_ms $((t1 - t0))) (after_restore hooks included)"
alive "$SERVER_PID" || die "no process $SERVER_PID after the restore"
[[ $(readlink "/proc/$SERVER_PID/exe") == "$SERVER_BIN" ]] ||
    die "pid $SERVER_PID is not cache-server after the restore"
say "pid $SERVER_PID runs again (same pid; now a child of pid $(awk '/^PPid:/ { print $2 }' "/proc/$SERVER_PID/status"), not of this script)"

after=$(ask STATS) || die "the restored cache-server does not answer STATS"
say "STATS before: $before"
say "STATS after:  $after"
expect_field "$after" pid "$SERVER_PID"
expect_field "$after" entries "$entries"
expect_field "$after" hits "$hits"
expect_field "$after" misses "$misses"
expect_field "$after" generation 1
expect_field "$after" last_restore restored
expect_field "$after" upstream_connection 2
expect_field "$after" upstream_connected true
say "same pid, same $entries entries and counters (the memory came back), generation 1," \
    "last restore 'restored', upstream connection #2"
say "it answers on port $CACHE_PORT through the listening socket it had: CRIU restored it" \
    "bound and listening (no hook closed or reopened it)"

# --- 7. The hook order -----------------------------------------------------------------------

step "The order in which things happened"
say "criu dump (images/dump.log) and the server's hooks (server.log):"
grep 'crac-action' "$IMG/dump.log" | indent
grep 'before_checkpoint' "$WORK/server.log" | indent
say "criu restore (images/restore.log) and the server's hooks (server.log):"
grep 'crac-action' "$IMG/restore.log" | indent
grep 'after_restore' "$WORK/server.log" | indent
say "upstream (upstream.log): one connection before, a new one after"
indent <"$WORK/upstream.log"

# --- 8. Serve --------------------------------------------------------------------------------

step "Serving from the restored process"
t0=$(now_us)
v=$(ask "GET key-1") || die "GET key-1: no reply"
t1=$(now_us)
[[ $v == value-of-key-1 ]] || die "GET key-1: unexpected reply '$v'"
say "GET key-1   -> $v   in $(fmt_ms $((t1 - t0))) (a hit: warm right after the restore)"
t0=$(now_us)
v=$(ask "GET new-key") || die "GET new-key: no reply"
t1=$(now_us)
[[ $v == value-of-new-key ]] || die "GET new-key: unexpected reply '$v'"
say "GET new-key -> $v in $(fmt_ms $((t1 - t0))) (a miss: through upstream connection #2)"
final=$(ask STATS) || die "STATS: no reply"
say "STATS: $final"
expect_field "$final" hits $((hits + 1))
expect_field "$final" misses $((misses + 1))
expect_field "$final" entries $((entries + 1))
