#!/usr/bin/env bash
# Fuzzes the agent's protocol and request handling for a bounded time: libFuzzer (cargo-fuzz,
# nightly toolchain) drives scripts of clients against a real agent through its socket
# (fuzz/fuzz_targets/agent_protocol.rs; what must hold is in test-support/src/agent_clients.rs,
# which the test suite also runs from a seeded generator, crac-agent/tests/random_clients.rs).
#
# Usage: scripts/fuzz.sh [SECONDS] [-- LIBFUZZER OPTIONS...]   (default 300 s; no root needed)
#
# Installs cargo-fuzz from crates.io if it is missing. The corpus grows in fuzz/corpus/ and
# a failing input is kept in fuzz/artifacts/ with the command that replays it; both are
# ignored by git. Exit status 0: no failure in the time given.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

info() { printf 'fuzz: %s\n' "$*"; }
die() {
    printf 'fuzz: error: %s\n' "$*" >&2
    exit 1
}

seconds=300
case ${1:-} in
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    "" | --) ;;
    *[!0-9]*) die "SECONDS must be a number, got '$1' (try --help)" ;;
    *) seconds=$1; shift ;;
esac
[[ ${1:-} == -- ]] && shift

command -v rustup >/dev/null || die "rustup not found: the fuzz target builds with a nightly toolchain through rustup"
rustup run nightly rustc --version >/dev/null 2>&1 ||
    die "no nightly toolchain: install one with 'rustup toolchain install nightly'"
if ! cargo fuzz --version >/dev/null 2>&1; then
    info "installing cargo-fuzz (cargo install --locked cargo-fuzz)"
    cargo install --locked cargo-fuzz
fi

# The agent's folder for the run, removed at the end whatever happens.
scratch=$(mktemp -d "${TMPDIR:-/tmp}/crac-fuzz.XXXXXX")
trap 'rm -rf "$scratch"' EXIT

info "fuzzing agent_protocol for ${seconds}s ($(cargo fuzz --version), $(rustup run nightly rustc --version))"
# The agent leaks the paths its signal handler reads, on purpose: suppressed by fuzz/lsan.supp.
CRAC_FUZZ_DIR=$scratch LSAN_OPTIONS="suppressions=$ROOT/fuzz/lsan.supp${LSAN_OPTIONS:+:$LSAN_OPTIONS}" \
    cargo +nightly fuzz run agent_protocol -- \
    -max_total_time="$seconds" -max_len=512 -print_final_stats=1 "$@"
info "no failure in ${seconds}s"
