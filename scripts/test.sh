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

if [[ $EUID -eq 0 ]]; then
    scripts/provision-criu.sh
    scripts/install-runtimes.sh
    scripts/postgres.sh install
else
    echo "test: not root, so CRIU, the container runtimes and PostgreSQL are not installed and end-to-end tests will skip (run as root to include them)"
fi

echo "test: cargo fmt --check"
cargo fmt --all -- --check
echo "test: cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "test: cargo doc (broken links and missing docs are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked
echo "test: cargo build"
cargo build --workspace --all-targets --locked
echo "test: cargo test"
cargo test --workspace --locked
