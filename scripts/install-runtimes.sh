#!/usr/bin/env bash
# Installs the container runtimes the end-to-end tests checkpoint containers with: runc,
# podman, Docker and a registry, from this machine's Debian packages (Debian 12: runc 1.1.5,
# podman 4.3.1, docker.io 20.10.24, docker-registry 2.8.2), if they are not there yet. podman
# brings conmon, and iptables with it; docker.io brings containerd. No daemon is started.
# Also curl, the real HTTP client of the draining tests (tests/e2e/drain.rs), and the sqlite3
# shell, whose open WAL database a test checkpoints (tests/e2e/files.rs).
#
# Nothing is configured system-wide: the tests name their own CRIU configuration in each
# container (the org.criu.config annotation) and keep podman's storage in their own folders,
# so /etc/criu and /etc/containers are left as the packages made them; the tests give their
# private dockerd its CRIU configuration through its environment (CRIU_CONFIG_FILE).
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

# What to install: runc and podman; Docker (Debian 12's docker.io: dockerd 20.10 with
# containerd 1.6 and its docker client at /usr/bin/docker) and Debian's docker-registry
# (distribution 2.8), which the tests start privately (test-support's docker and registry).
missing=()
command -v runc >/dev/null || missing+=(runc)
command -v podman >/dev/null || missing+=(podman)
command -v dockerd >/dev/null || missing+=(docker.io)
command -v docker-registry >/dev/null || missing+=(docker-registry)
command -v curl >/dev/null || missing+=(curl)
command -v sqlite3 >/dev/null || missing+=(sqlite3)
# setcap: scripts/container-image.sh --docker --user gives crac file capabilities.
command -v setcap >/dev/null || missing+=(libcap2-bin)
if ((${#missing[@]} == 0)); then
    info "runc, podman, dockerd, docker-registry, curl, sqlite3 and setcap are installed; nothing to do."
    exit 0
fi
((EUID == 0)) || die "must run as root to install ${missing[*]} (apt-get install ${missing[*]})"
command -v apt-get >/dev/null || die "apt-get not found: install ${missing[*]} with this system's package manager"
export DEBIAN_FRONTEND=noninteractive
# The packages' maintainer scripts start dockerd, containerd and the registry system-wide
# (through invoke-rc.d, with or without systemd): the tests run their own, privately, and the
# machine must not be left with daemons or their iptables rules. A policy-rc.d that refuses
# every start (exit 101) stops that for the install's duration; one already there is kept.
policy=/usr/sbin/policy-rc.d
if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\n# scripts/install-runtimes.sh: no service starts while it installs\nexit 101\n' >"$policy"
    chmod 0755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi
info "installing ${missing[*]} from Debian's packages (no service started)"
# A fresh machine may have no package lists yet.
if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
    apt-get update -q >/dev/null || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
        die "apt-get install ${missing[*]} failed"
fi
for daemon in dockerd containerd docker-registry; do
    ! pgrep -x "$daemon" >/dev/null || die "$daemon is running after the install: stop it (the tests start their own)"
done
info "installed: runc $(runc --version | sed -n 's/^runc version //p'), $(podman --version), $(dockerd --version), docker-registry $(docker-registry --version 2>&1 | awk '{print $NF}')"
