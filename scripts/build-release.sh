#!/usr/bin/env bash
# Builds the release binaries as they are meant to be installed: the workspace with LTO, and
# crac-action linked statically, because CRIU starts it at every step of a dump and a restore
# and waits for it; a static binary starts as fast as /bin/true, about 0.2 ms sooner than a
# dynamically linked one (BENCHMARKS.md, item 1). Binaries end up in target/release.
#
# Usage: scripts/build-release.sh [--install DIR]   (--install copies crac and crac-action
#        into DIR, e.g. /usr/local/bin)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

install_dir=
while (($#)); do
    case $1 in
        --install) install_dir=${2:?--install needs a folder}; shift 2 ;;
        -h | --help) sed -n '2,8{s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
        *) echo "build-release: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done

cargo build --release --workspace --locked
# Only the final link of crac-action gets crt-static: every library, and proc-macros, stay as
# they are (a global RUSTFLAGS=+crt-static would break proc-macro crates).
cargo rustc --release --locked -p crac-action --bin crac-action -- -C target-feature=+crt-static
if ! file target/release/crac-action 2>/dev/null | grep -q 'static'; then
    if command -v file >/dev/null; then
        echo "build-release: crac-action is not statically linked" >&2
        exit 1
    fi
fi
if [[ -n $install_dir ]]; then
    install -d "$install_dir"
    install -m 0755 target/release/crac target/release/crac-action "$install_dir/"
    echo "build-release: installed crac and crac-action into $install_dir"
fi
