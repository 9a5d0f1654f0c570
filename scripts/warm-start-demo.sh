#!/usr/bin/env bash
# Warm start with crac-rs: a service that needs seconds of warm-up (it indexes documents) is
# started cold by `crac run`, checkpoints itself once it is warm and keeps serving; the next
# `crac run` of the same command restores that image and answers at once. This script measures
# the time from launch to the first answer both ways.
#
# Usage: sudo scripts/warm-start-demo.sh      (root: CRIU needs it; runs from any directory)
#   It provisions CRIU >= 4.2 (scripts/provision-criu.sh), builds the workspace in release
#   mode (so the timings mean something), then:
#     a) cold: `crac run --image warm -- warm-start --port P`: no image yet, so it starts the
#        service cold; the service warms up, answers, checkpoints itself into the store and
#        keeps serving. The script waits for the image, asks a few questions, stops it.
#     b) warm: the same command again, WARM_DEMO_RUNS times: each restores the image; the
#        script checks that the answers are the same as cold and that every restored copy has
#        an instance id of its own, then stops it.
#     c) a table: cold and warm time to first answer, and warm as a % of cold.
#   Everything it starts is stopped at exit, and the temporary folder (image store and logs)
#   is removed.
#
#   WARM_DEMO_PORT  the service's port (default 17080)
#   WARM_DEMO_DOCS  documents to index at the cold start (default: warm-start's own, 100000)
#   WARM_DEMO_RUNS  how many warm starts to measure (default 3)
#   WARM_DEMO_KEEP=1  keep the temporary folder (store, images, logs) instead of deleting it
#   CRAC_CRIU / CRAC_CRIU_PREFIX  as for scripts/provision-criu.sh
set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DEMO_NAME=warm-start-demo
# shellcheck source=scripts/demo-lib.sh
source "$ROOT/scripts/demo-lib.sh"

PORT=${WARM_DEMO_PORT:-17080}
DOCS=${WARM_DEMO_DOCS:-}
RUNS=${WARM_DEMO_RUNS:-3}
IMAGE=warm
# Words to look up: very common, common, rare, the first 4-syllable word, and none.
WORDS=(ka kalo sutewa kakakaka nosuchword)
# How long a start may take before the script gives up (the cold one includes the warm-up).
START_TIMEOUT_S=120


# --- Preconditions ---------------------------------------------------------------------------

((EUID == 0)) || die "run me as root (CRIU needs root to dump and restore): sudo $0"
[[ $PORT =~ ^[0-9]+$ && $RUNS =~ ^[0-9]+$ ]] || die "WARM_DEMO_PORT and WARM_DEMO_RUNS must be numbers"
((RUNS >= 1)) || die "WARM_DEMO_RUNS must be at least 1"
[[ -z $DOCS || $DOCS =~ ^[1-9][0-9]*$ ]] || die "WARM_DEMO_DOCS must be a number above 0"
command -v cargo >/dev/null ||
    die "cargo not found in PATH (under sudo, try: sudo env \"PATH=\$PATH\" $0)"

# --- Helpers ---------------------------------------------------------------------------------

now_ns() { date +%s%N; }
# Milliseconds with one decimal, from nanoseconds.
fmt_ms() { printf '%d.%d ms' $(($1 / 1000000)) $((($1 % 1000000) / 100000)); }

# One request to the service; prints the one-line reply. Fails if there is none, or if the
# reply is an error.
ask() {
    local fd reply
    { exec {fd}<>"/dev/tcp/127.0.0.1/$PORT"; } 2>/dev/null || return 1
    if ! printf '%s\n' "$1" >&"$fd" 2>/dev/null || ! IFS= read -r -t 5 reply <&"$fd"; then
        exec {fd}>&-
        return 1
    fi
    exec {fd}>&-
    [[ $reply != ERR* ]] || return 1
    printf '%s\n' "$reply"
}

# Asks until there is an answer (the service may not listen yet, or a checkpoint may hold the
# request in the listener's queue), for up to 10 s.
ask_retry() {
    local i
    for ((i = 0; i < 1000; i++)); do
        ask "$1" && return 0
        sleep 0.01
    done
    return 1
}




# --- Cleanup: everything this script started, by pid, and the temporary folder ---------------

WORK=''
STORE=''
CRAC=''
SERVICE=''
RUN_PIDS=()     # the `crac run` processes this script started
SERVICE_PIDS=() # the services they started or restored (a restored one is not our child)

# Processes that carry this run's store in their environment: crac run, the service (cold or
# restored), and the helpers of its self-checkpoint (crac's worker, crac-action's watcher).
# Nothing else on the machine names this temporary folder.
ours() {
    local p
    [[ -n $STORE ]] || return 0
    for p in /proc/[0-9]*; do
        p=${p#/proc/}
        ((p != $$)) || continue
        { tr '\0' '\n' <"/proc/$p/environ"; } 2>/dev/null | grep -qxF "CRAC_STORE=$STORE" && echo "$p"
    done
    return 0
}

stop_pid() { # stop_pid PID [EXE]: SIGTERM, up to 5 s, then SIGKILL; only if it still runs EXE
    local pid=$1 exe=${2:-} i
    alive "$pid" || { wait "$pid" 2>/dev/null || true; return 0; }
    [[ -z $exe || $(readlink "/proc/$pid/exe" 2>/dev/null) == "$exe" ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        say "pid $pid did not stop on SIGTERM: SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

cleanup() {
    local rc=$? pid f
    trap - ERR
    set +e
    if ((rc != 0)) && [[ -n $WORK && -d $WORK ]]; then
        printf '\n--- logs, for diagnosis ---\n' >&2
        for f in "$WORK"/*.err "$STORE"/*.log "$STORE/$IMAGE"/*.log "$STORE"/.*/*.log; do
            [[ -s $f ]] || continue
            printf '\n--- %s (last 40 lines) ---\n' "$f" >&2
            tail -n 40 "$f" >&2
        done
    fi
    # crac run forwards SIGTERM to its service and exits with it; then the services, should one
    # have outlived its crac run; then anything else still carrying this run's store.
    for pid in "${RUN_PIDS[@]}"; do stop_pid "$pid" "$CRAC"; done
    for pid in "${SERVICE_PIDS[@]}"; do stop_pid "$pid" "$SERVICE"; done
    for pid in $(ours); do
        say "stopping leftover pid $pid ($(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null))"
        stop_pid "$pid"
    done
    # An agent removes its socket folder when SIGTERM ends it, not after a SIGKILL.
    # It is in the first agent base that has it (crac_protocol::location::base_dir); only ours is removed.
    for pid in "${SERVICE_PIDS[@]}"; do
        alive "$pid" && continue
        for base in "${CRAC_AGENT_DIR:-}" /run/crac "${XDG_RUNTIME_DIR:+$XDG_RUNTIME_DIR/crac}" /tmp/crac; do
            if [[ -n $base && -d $base/$pid && -O $base/$pid && ! -L $base/$pid ]]; then rm -rf "${base:?}/$pid"; fi
        done
    done
    if [[ -n $WORK && -d $WORK ]]; then
        if [[ ${WARM_DEMO_KEEP:-0} == 1 ]]; then
            say "kept $WORK (image store and logs)"
        else
            rm -rf "$WORK"
        fi
    fi
    if ((rc == 0)); then printf '\n%swarm-start-demo: OK%s\n' "$GREEN" "$OFF"; fi
    exit "$rc"
}
trap cleanup EXIT

# --- 1. CRIU and the build ---------------------------------------------------------------------

step "Provisioning CRIU >= 4.2 (scripts/provision-criu.sh; a no-op when it is already there)"
bash scripts/provision-criu.sh 2>&1 | indent || die "provisioning CRIU failed (see above)"

step "Building the workspace in release mode (cargo build --release --workspace)"
cargo build --release --workspace 2>&1 | indent || die "cargo build failed (see above)"
TARGET_DIR=${CARGO_TARGET_DIR:-target}
[[ $TARGET_DIR == /* ]] || TARGET_DIR=$ROOT/$TARGET_DIR
BIN=$TARGET_DIR/release
CRAC=$BIN/crac
SERVICE=$BIN/warm-start
for b in "$CRAC" "$BIN/crac-action" "$SERVICE"; do
    [[ -x $b ]] || die "$b was not built (is CARGO_TARGET_DIR or build.target-dir set elsewhere?)"
done
say "$ crac check"
"$CRAC" check 2>&1 | indent || die "crac check: checkpoint/restore is not possible here (see above)"

! port_open "$PORT" || die "port $PORT is already in use; pick another with WARM_DEMO_PORT"
WORK=$(mktemp -d /tmp/warm-start-demo.XXXXXX)
STORE=$WORK/store
SERVICE_ARGS=(--port "$PORT")
[[ -z $DOCS ]] || SERVICE_ARGS+=(--docs "$DOCS")
RUN_CMD=("$CRAC" run --image "$IMAGE" -- "$SERVICE" "${SERVICE_ARGS[@]}")
say "image store: $STORE (CRAC_STORE)"
say "command:     crac run --image $IMAGE -- $SERVICE ${SERVICE_ARGS[*]}"

# Starts `crac run` in the background (its stderr to $1) and waits for the first answer to
# STATS. Sets RUN_PID, FIRST_NS (launch to first answer) and FIRST_STATS.
RUN_PID=''
FIRST_NS=0
FIRST_STATS=''
launch() {
    local err=$1 t0 t1 deadline reply
    t0=$(now_ns)
    CRAC_STORE=$STORE "${RUN_CMD[@]}" 2>"$err" &
    RUN_PID=$!
    RUN_PIDS+=("$RUN_PID")
    deadline=$((t0 + START_TIMEOUT_S * 1000000000))
    until reply=$(ask STATS); do
        alive "$RUN_PID" || die "crac run (pid $RUN_PID) exited before the service answered: $(cat "$err")"
        (($(now_ns) < deadline)) || die "no answer on port $PORT within $START_TIMEOUT_S s"
        sleep 0.005
    done
    t1=$(now_ns)
    FIRST_NS=$((t1 - t0))
    FIRST_STATS=$reply
    SERVICE_PIDS+=("$(field "$reply" pid)")
}

# Stops the service: SIGTERM to crac run, which forwards it and exits with the service.
stop_service() {
    local pid=$1 rc=0
    kill -TERM "$RUN_PID"
    wait "$RUN_PID" || rc=$?
    alive "$pid" && die "pid $pid still runs after crac run exited"
    say "SIGTERM to crac run (pid $RUN_PID): it exited with $rc; service pid $pid is gone"
}

# --- 2. Cold start -------------------------------------------------------------------------------

step "Cold start: no image yet, crac run starts the service, which warms up"
launch "$WORK/run-cold.err"
COLD_NS=$FIRST_NS
COLD_STATS=$FIRST_STATS
PID=$(field "$COLD_STATS" pid)
say "first answer $(fmt_ms "$COLD_NS") after launch"
say "crac run said:"
indent <"$WORK/run-cold.err"
say "STATS: $COLD_STATS"
expect_field "$COLD_STATS" started cold
grep -q "started cold as pid $PID" "$WORK/run-cold.err" || die "crac run did not start pid $PID cold"

say "waiting for the service to checkpoint itself into image '$IMAGE' ..."
for ((i = 0; i < 600; i++)); do
    grep -q "image \"$IMAGE\" saved" "$STORE/$IMAGE.log" 2>/dev/null && break
    grep -q 'warm-start: no image' "$STORE/$IMAGE.log" 2>/dev/null &&
        die "the self-checkpoint failed: $(grep 'warm-start: no image' "$STORE/$IMAGE.log")"
    alive "$PID" || die "the service (pid $PID) died while checkpointing itself"
    sleep 0.1
done
grep -q "image \"$IMAGE\" saved" "$STORE/$IMAGE.log" || die "no image after 60 s"
[[ -f $STORE/$IMAGE/crac-meta.json ]] || die "the service says the image is saved, but $STORE/$IMAGE/crac-meta.json is missing"
say "the service's log ($STORE/$IMAGE.log):"
indent <"$STORE/$IMAGE.log"
say "$ crac images list"
"$CRAC" --store "$STORE" images list | indent
say "crac-action's lines in CRIU's log ($IMAGE/dump.log):"
grep 'crac-action' "$STORE/$IMAGE/dump.log" | indent

stats=$(ask_retry STATS) || die "the cold service does not answer after its checkpoint"
say "STATS after the checkpoint: $stats"
expect_field "$stats" pid "$PID"
expect_field "$stats" started cold
expect_field "$stats" image saved
expect_field "$stats" last_restore resumed
COLD_INSTANCE=$(field "$stats" instance)
declare -A COLD_ANSWER
for w in "${WORDS[@]}"; do
    COLD_ANSWER[$w]=$(ask_retry "SEARCH $w") || die "SEARCH $w: no answer"
    say "SEARCH $w -> ${COLD_ANSWER[$w]}"
done
[[ ${COLD_ANSWER[nosuchword]} == "OK 0" ]] || die "SEARCH nosuchword: expected 'OK 0'"
[[ ${COLD_ANSWER[kalo]} =~ ^OK\ [1-9] ]] || die "SEARCH kalo: expected some documents"
stop_service "$PID"

# --- 3. Warm starts ------------------------------------------------------------------------------

WARM_NS=()
declare -A SEEN_INSTANCE=(["$COLD_INSTANCE"]=cold)
for ((run = 1; run <= RUNS; run++)); do
    step "Warm start $run of $RUNS: the same command; crac run restores the image"
    alive "$PID" && die "pid $PID is still taken; the restore needs it free"
    log_lines=$(wc -l <"$STORE/$IMAGE.log")
    launch "$WORK/run-warm-$run.err"
    WARM_NS+=("$FIRST_NS")
    say "first answer $(fmt_ms "$FIRST_NS") after launch"
    say "crac run said:"
    indent <"$WORK/run-warm-$run.err"
    grep -q "restored image \"$IMAGE\" as pid" "$WORK/run-warm-$run.err" ||
        die "crac run did not restore the image (see its lines above)"
    say "STATS: $FIRST_STATS"
    expect_field "$FIRST_STATS" pid "$PID"
    expect_field "$FIRST_STATS" started restored
    expect_field "$FIRST_STATS" last_restore restored
    expect_field "$FIRST_STATS" image "started from it"
    expect_field "$FIRST_STATS" docs "$(field "$COLD_STATS" docs)"
    expect_field "$FIRST_STATS" terms "$(field "$COLD_STATS" terms)"
    instance=$(field "$FIRST_STATS" instance)
    [[ -z ${SEEN_INSTANCE[$instance]:-} ]] ||
        die "instance id $instance was already used by the ${SEEN_INSTANCE[$instance]} start"
    SEEN_INSTANCE[$instance]="warm #$run"
    if ((run == 1)); then
        say "the restored process's lines in the service's log:"
        tail -n "+$((log_lines + 1))" "$STORE/$IMAGE.log" | indent
        say "crac-action's lines in CRIU's log ($IMAGE/restore.log):"
        grep 'crac-action' "$STORE/$IMAGE/restore.log" | indent
    fi
    for w in "${WORDS[@]}"; do
        answer=$(ask_retry "SEARCH $w") || die "SEARCH $w: no answer"
        [[ $answer == "${COLD_ANSWER[$w]}" ]] ||
            die "SEARCH $w: '$answer' after the restore, '${COLD_ANSWER[$w]}' cold"
        ((run > 1)) || say "SEARCH $w -> $answer (same as cold)"
    done
    ((run == 1)) || say "SEARCH ${WORDS[*]}: the same answers as cold"
    say "instance $instance (cold: $COLD_INSTANCE): renewed on restore"
    stop_service "$PID"
done

# --- 4. Figures ------------------------------------------------------------------------------

step "Time from launch to first answer"
mapfile -t sorted < <(printf '%s\n' "${WARM_NS[@]}" | sort -n)
MEDIAN_NS=${sorted[$((${#sorted[@]} / 2))]}
if ((${#sorted[@]} % 2 == 0)); then
    MEDIAN_NS=$(((sorted[${#sorted[@]} / 2 - 1] + sorted[${#sorted[@]} / 2]) / 2))
fi
pct() { # pct PART WHOLE: PART as a percentage of WHOLE, one decimal
    local tenths=$(((1000 * $1 + $2 / 2) / $2))
    printf '%d.%d %%' $((tenths / 10)) $((tenths % 10))
}
warmup=$(field "$COLD_STATS" warmup_ms)
printf '    %-30s %12s %14s\n' "start" "first answer" "% of cold"
printf '    %-30s %12s %14s\n' "cold (warm-up $warmup ms)" "$(fmt_ms "$COLD_NS")" "100.0 %"
for ((run = 1; run <= RUNS; run++)); do
    ns=${WARM_NS[$((run - 1))]}
    printf '    %-30s %12s %14s\n' "restored #$run" "$(fmt_ms "$ns")" "$(pct "$ns" "$COLD_NS")"
done
printf '    %-30s %12s %14s\n' "restored, median of $RUNS" "$(fmt_ms "$MEDIAN_NS")" "$(pct "$MEDIAN_NS" "$COLD_NS")"
say "" "image: $(du -sh "$STORE/$IMAGE" | cut -f1) on disk; speed-up (cold / median restored): $(((COLD_NS * 10 / MEDIAN_NS) / 10)).$(((COLD_NS * 10 / MEDIAN_NS) % 10))x"
