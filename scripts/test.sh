#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this): provisions CRIU, installs runc,
# podman and PostgreSQL, checks formatting and lints, builds everything, and runs every test,
# end-to-end ones against the real CRIU, the real container runtimes and a real PostgreSQL.
#
# As root, CRIU is provisioned, the runtimes installed, and the end-to-end tests run. Not as
# root, they skip with a message, except in CI (CI=true), where a missing CRIU or runtime fails
# them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# One line at the end says how it went, and which step failed.
started=$SECONDS
step="provisioning CRIU and the container runtimes"
trap 'rc=$?; if ((rc == 0)); then echo "test: ok: fmt, clippy, rustdoc, build and every test passed in $((SECONDS - started)) s"; else echo "test: FAILED at step: $step (exit code $rc; its output is above)" >&2; fi' EXIT

if [[ $EUID -eq 0 ]]; then
    scripts/provision-criu.sh
    scripts/install-runtimes.sh
    scripts/postgres.sh install
else
    echo "test: not root, so CRIU, the container runtimes and PostgreSQL are not installed and end-to-end tests will skip (run as root to include them)"
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
cargo test --workspace --locked
