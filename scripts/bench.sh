#!/usr/bin/env bash
# The benchmarks of crac-rs (BENCHMARKS.md says what each measures and how to read it).
#
# Usage: sudo scripts/bench.sh [crac-bench options]      (root: CRIU needs it; any directory)
#   --quick          fewer repetitions: a smoke run, noisier figures (about a minute)
#   --only LIST      items to run, e.g. --only 1 or --only 1,3,5 (default: all of 1-17)
#   --idle-secs N    how long item 5 watches the idle agent (default 10)
#   --soak N         item 6's cycles of each kind, killing and --leave-running (default 100)
#   --alt-action P   item 1 also measures another crac-action build (e.g. a static one)
#   --out FILE       where the markdown results go (default: target/bench/results.md)
#
# It provisions CRIU >= 4.2 (scripts/provision-criu.sh, a no-op when it is there), installs
# socat (the baseline of item 1) and runc, podman, Docker and docker-registry (items 10 and
# 15) from Debian's packages if
# they are missing, builds the workspace in release mode, then runs target/release/crac-bench,
# which prints every figure with its target and whether it is met, and writes them as
# markdown to the --out file, shown at the end. A full run takes a few minutes. Each figure
# is a median over repeated runs and each claim a ratio against a baseline measured in the
# same run: the machine may be noisy.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

info() { printf 'bench: %s\n' "$*"; }
die() {
    printf 'bench: error: %s\n' "$*" >&2
    exit 1
}

out=''
args=()
original=("$@")
while (($#)); do
    case $1 in
        -h | --help)
            sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
            exit 0
            ;;
        --out)
            (($# >= 2)) || die "--out needs a file"
            out=$2
            shift 2
            ;;
        --out=*)
            out=${1#--out=}
            shift
            ;;
        *)
            args+=("$1")
            shift
            ;;
    esac
done

((EUID == 0)) || die "run me as root (CRIU needs root to dump and restore): sudo $0 ${original[*]:-}"
command -v cargo >/dev/null || die "cargo not found in PATH (under sudo, try: sudo env \"PATH=\$PATH\" $0)"

info "provisioning CRIU >= 4.2 (scripts/provision-criu.sh)"
bash scripts/provision-criu.sh

if ! command -v socat >/dev/null; then
    info "installing socat (the baseline action script of item 1 uses it)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y socat >/dev/null 2>&1 || {
        apt-get update >/dev/null
        apt-get install -y socat >/dev/null
    }
    command -v socat >/dev/null || die "socat could not be installed"
fi

info "installing runc, podman, Docker and docker-registry if missing (items 10 and 15; scripts/install-runtimes.sh)"
bash scripts/install-runtimes.sh

info "building the release binaries as installed (scripts/build-release.sh: LTO, static crac-action)"
"$ROOT/scripts/build-release.sh"

TARGET_DIR=${CARGO_TARGET_DIR:-target}
[[ $TARGET_DIR == /* ]] || TARGET_DIR=$ROOT/$TARGET_DIR
BENCH=$TARGET_DIR/release/crac-bench
[[ -x $BENCH ]] || die "$BENCH was not built"
[[ -n $out ]] || out=$TARGET_DIR/bench/results.md
mkdir -p "$(dirname "$out")"

info "running $BENCH ${args[*]:-} --out $out"
rc=0
"$BENCH" "${args[@]}" --out "$out" || rc=$?

if [[ -s $out ]]; then
    printf '\n===== %s =====\n' "$out"
    cat "$out"
fi
((rc == 0)) || die "crac-bench failed (exit code $rc): an item could not be measured (see above)"
