#!/usr/bin/env bash
# Installs the container runtimes the end-to-end tests checkpoint containers with: runc and
# podman, from this machine's Debian packages (Debian 12: runc 1.1.5, podman 4.3.1), if they
# are not there yet. podman brings conmon, and iptables with it. Also the sqlite3 shell, whose
# open WAL database a test checkpoints (tests/e2e/files.rs).
#
# Nothing is configured system-wide: the tests name their own CRIU configuration in each
# container (the org.criu.config annotation) and keep podman's storage in their own folders,
# so /etc/criu and /etc/containers are left as the packages made them.
#
# Usage: scripts/install-runtimes.sh   (as root)
set -euo pipefail

info() { printf 'install-runtimes: %s\n' "$*"; }
die() {
    printf 'install-runtimes: error: %s\n' "$*" >&2
    exit 1
}

case ${1:-} in
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    "") ;;
    *) die "unknown argument '$1' (try --help)" ;;
esac

missing=()
for tool in runc podman sqlite3; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if ((${#missing[@]} == 0)); then
    info "runc $(runc --version | sed -n 's/^runc version //p') and $(podman --version) are installed; nothing to do."
    exit 0
fi
((EUID == 0)) || die "must run as root to install ${missing[*]} (apt-get install ${missing[*]})"
command -v apt-get >/dev/null || die "apt-get not found: install ${missing[*]} with this system's package manager"
export DEBIAN_FRONTEND=noninteractive
info "installing ${missing[*]} from Debian's packages"
# A fresh machine may have no package lists yet.
if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
    apt-get update -q >/dev/null || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
        die "apt-get install ${missing[*]} failed"
fi
info "installed: runc $(runc --version | sed -n 's/^runc version //p'), $(podman --version)"
