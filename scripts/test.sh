#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this): provisions CRIU, installs runc,
# podman and PostgreSQL, checks formatting and lints, builds everything, and runs every test,
# end-to-end ones against the real CRIU, the real container runtimes and a real PostgreSQL.
#
# The tests that need root, CRIU, runc and podman or PostgreSQL are marked
# `#[ignore = "needs ..."]`, so a plain `cargo test` reports them as ignored; this script runs
# them too (`--include-ignored`, given to every test binary and the doc-tests: a doc example
# that cannot compile is marked `text`, not `ignore`). As root, CRIU is provisioned, the
# runtimes and PostgreSQL installed, and they run. Not as root, they skip with a line saying
# how to run them, except in CI (CI=true), where a missing CRIU, runtime or PostgreSQL fails
# them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The folders that services and crac make on the way (agents' bases, the per-pid checkpoint
# locks) are removed at the end if the run made them: the machine is left as it was found.
# What is left in them then is the agents' folders of test services that tests killed with
# SIGKILL (an agent removes its own folder when its process exits any other way); every test
# service is gone by then.
made_here=()
for dir in /run/crac /run/crac-locks /tmp/crac; do
    [[ -e $dir ]] || made_here+=("$dir")
done
tidy() { for dir in "${made_here[@]}"; do rm -rf --one-file-system "$dir" 2>/dev/null || true; done; }

# One line at the end says how it went, and which step failed.
started=$SECONDS
step="provisioning CRIU and the container runtimes"
trap 'rc=$?; tidy; if ((rc == 0)); then echo "test: ok: fmt, clippy, rustdoc, build and every test passed in $((SECONDS - started)) s"; else echo "test: FAILED at step: $step (exit code $rc; its output is above)" >&2; fi' EXIT

if [[ $EUID -eq 0 ]]; then
    scripts/provision-criu.sh
    scripts/install-runtimes.sh
    scripts/postgres.sh install
else
    echo "test: not root, so CRIU, the container runtimes and PostgreSQL are not installed and the tests that need them will skip (run as root to include them)"
fi

step="cargo fmt --check"
echo "test: $step"
cargo fmt --all -- --check
step="cargo clippy"
echo "test: $step"
cargo clippy --workspace --all-targets --locked -- -D warnings
step="cargo doc"
echo "test: $step (broken links and missing docs are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
step="cargo build"
echo "test: $step"
cargo build --workspace --all-targets --locked
step="cargo test"
echo "test: $step"
cargo test --workspace --locked -- --include-ignored
