# Shared by scripts/demo.sh and scripts/warm-start-demo.sh (sourced, not run): how they print
# steps and failures, and how they look at ports, processes and the examples' STATS replies.
# The sourcing script sets DEMO_NAME (its name in failure messages) first.

if [[ -t 1 ]]; then BOLD=$'\e[1m' RED=$'\e[31m' GREEN=$'\e[32m' OFF=$'\e[0m'; else BOLD='' RED='' GREEN='' OFF=''; fi
STEP_NO=0
step() {
    STEP_NO=$((STEP_NO + 1))
    printf '\n%s==> %d. %s%s\n' "$BOLD" "$STEP_NO" "$*" "$OFF"
}
say() { printf '    %s\n' "$@"; }
indent() { sed 's/^/    | /'; }
die() {
    printf '\n%s%s: FAILED: %s%s\n' "$RED" "$DEMO_NAME" "$*" "$OFF" >&2
    exit 1
}
trap 'die "command failed (exit code $?) at line $LINENO: $BASH_COMMAND"' ERR

# Whether something accepts connections on a local port.
port_open() {
    local fd
    { exec {fd}<>"/dev/tcp/127.0.0.1/$1"; } 2>/dev/null || return 1
    exec {fd}>&-
}

# Whether process $1 exists and is not a zombie.
alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

# A numeric or string field of a one-line STATS JSON (flat object, no nested values).
field() {
    local re="\"$2\":(\"[^\"]*\"|[^,}]*)"
    [[ $1 =~ $re ]] || return 1
    local v=${BASH_REMATCH[1]}
    v=${v#\"}
    echo "${v%\"}"
}

expect_field() { # expect_field JSON NAME WANT
    local got
    got=$(field "$1" "$2") || die "STATS has no field '$2': $1"
    [[ $got == "$3" ]] || die "STATS: expected $2 = $3, got $got ($1)"
}
