#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this): provisions CRIU, checks formatting
# and lints, builds everything, and runs every test, end-to-end ones against the real CRIU.
#
# As root, CRIU is provisioned and the end-to-end tests run. Not as root, they skip with a
# message, except in CI (CI=true), where a missing CRIU fails them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ $EUID -eq 0 ]]; then
    scripts/provision-criu.sh
else
    echo "test: not root, so CRIU is not provisioned and end-to-end tests will skip (run as root to include them)"
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
