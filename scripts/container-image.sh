#!/usr/bin/env bash
# Builds a container image that starts a service warm: its entrypoint is `crac run`, which
# restores the service's checkpoint when the image carries one, and starts it cold (saying
# why) when it does not, or when the checkpoint is damaged or refused here (CPU, kernel, CRIU).
#
# The image holds the service and the shared libraries it needs, crac and crac-action, and
# CRIU >= 4.2 with its libraries (the one crac finds: $CRAC_CRIU, `criu` on PATH, or the copy
# scripts/provision-criu.sh makes, whose newer C library then serves every program in the
# image). No registry is needed: the root file system is made here and imported.
#
# Usage: scripts/container-image.sh [options] TAG -- SERVICE [ARGS...]
#   TAG               the image to make, e.g. localhost/warm-start:cold
#   SERVICE [ARGS]    the service's binary on this machine, and its arguments in the container;
#                     it is copied to /app/ under its own name
#   --name NAME       the checkpoint's name in the image's store (default: SERVICE's file name)
#   --bin-dir DIR     where crac and crac-action are (default: target/release of this checkout)
#   --tar FILE        also keep the root file system as this tar file
#   --docker          build it with Docker (scripts/warm-start.Dockerfile) instead of podman:
#                     the service goes to /app/service, its checkpoint is named `service`, and
#                     its arguments are the container's command (`docker run TAG /app/service
#                     ARGS`), not the image's
#   --user UID:GID    the service runs as this user (`podman run --user UID:GID`): the image's
#                     store belongs to it (crac, CRIU and the service then need
#                     CAP_CHECKPOINT_RESTORE, which the runtime gives as an ambient capability);
#                     with --docker, whose 20.10 gives a user no ambient capabilities, crac gets
#                     file capabilities (setcap, so run this as root) and passes them on to CRIU
#
# Environment: PODMAN, the podman command to import with (default `podman`; word-split, so
# `PODMAN="podman --root /some/where"` uses other storage), DOCKER the docker command to build
# with (default `docker`, word-split the same way), and CRAC_CRIU as for crac.
#
# The warm-up, done once where the image is built (XTDB's and PrestaShop's guides do the same
# steps by hand):
#   podman run -d --name warmup --cap-add CHECKPOINT_RESTORE \
#       --security-opt seccomp=unconfined --network host TAG
#     the service starts cold; a service that checkpoints itself (crac_agent::SelfCheckpoint,
#     e.g. examples/warm_start.rs) does so once it is warm, or run
#     `podman exec warmup crac checkpoint --leave-running --name NAME PID` (`crac ps` lists it)
#   podman exec warmup crac images list      # the checkpoint is there
#   podman stop warmup && podman commit warmup TAG-warm
#   podman run --cap-add CHECKPOINT_RESTORE --network host TAG-warm   # restored; cold if not
# CRIU in a container needs CAP_CHECKPOINT_RESTORE (crac runs it in its unprivileged mode
# without CAP_SYS_ADMIN), the dump also an unconfined seccomp (CRIU suspends the service's
# filter), and a restore the capabilities the warm-up had (docs/containers.md has the table).
# `podman save` or `podman push` carries the checkpoint with the image.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

info() { printf 'container-image: %s\n' "$*"; }
die() {
    printf 'container-image: error: %s\n' "$*" >&2
    exit 1
}

name=''
bin_dir=$ROOT/target/release
tar_out=''
user=''
docker=''
tag=''
while (($#)); do
    case $1 in
        -h | --help)
            sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
            exit 0
            ;;
        --name | --bin-dir | --tar | --user)
            (($# >= 2)) || die "$1 needs a value"
            case $1 in
                --name) name=$2 ;;
                --bin-dir) bin_dir=$2 ;;
                --tar) tar_out=$2 ;;
                --user) user=$2 ;;
            esac
            shift 2
            ;;
        --docker)
            docker=1
            shift
            ;;
        --)
            shift
            break
            ;;
        -*) die "unknown option '$1' (try --help)" ;;
        *)
            [[ -z $tag ]] || die "one TAG only, then -- and the service (try --help)"
            tag=$1
            shift
            ;;
    esac
done
[[ -n $tag ]] || die "no TAG given (try --help)"
(($#)) || die "no service given after -- (try --help)"
service=$1
shift
[[ -f $service && -x $service ]] || die "the service $service is not an executable file"
# The image has no shell: the service must be a program, not a script.
is_elf() { [[ $(head -c 4 "$1" 2>/dev/null) == $'\x7fELF' ]]; }
is_elf "$service" || die "the service $service is not an ELF program (the image has no shell to run a script)"
if [[ -n $docker ]]; then
    [[ -z $name || $name == service ]] || die "--docker names the checkpoint 'service' (the Dockerfile's entrypoint): drop --name"
    name=service
fi
name=${name:-$(basename "$service")}
[[ -z $user || $user =~ ^[0-9]+:[0-9]+$ ]] || die "--user takes numbers, UID:GID (got '$user')"
[[ $name =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] || die "'$name' is not a valid image name (letters, digits, . _ -)"
for bin in crac crac-action; do
    [[ -x $bin_dir/$bin ]] || die "no $bin in $bin_dir (build it: cargo build --release --workspace, or name the folder with --bin-dir)"
done
if [[ -n $docker ]]; then
    read -r -a engine <<<"${DOCKER:-docker}"
else
    read -r -a engine <<<"${PODMAN:-podman}"
fi
command -v "${engine[0]}" >/dev/null || die "${engine[0]} not found (scripts/install-runtimes.sh installs it)"

rootfs=$(mktemp -d)
tar=${tar_out:-$rootfs.tar}
trap 'rm -rf "$rootfs"; [[ -n $tar_out ]] || rm -f "$tar"' EXIT

# Copies the file $1 to $2 inside the image (a folder path ending in / keeps the name).
put() {
    local dest=$rootfs/${2#/}
    [[ $dest == */ ]] && dest=$dest$(basename "$1")
    mkdir -p "$(dirname "$dest")"
    cp -L "$1" "$dest"
}

# Copies the shared libraries the program $1 loads into the image: the loader at its own
# path, the others into the folder the loader searches by default (the image has no
# ld.so.cache, so a library found on this machine through /etc/ld.so.conf would not be found
# at its own path).
TRIPLET=$(uname -m)-linux-gnu
put_libraries() {
    local out lib
    out=$(LC_ALL=C ldd "$1" 2>&1) || {
        # A static binary (crac-action as scripts/build-release.sh builds it) needs none.
        [[ $out == *"not a dynamic executable"* ]] && return 0
        die "cannot list the libraries of $1: $out"
    }
    [[ $out != *"not found"* ]] || die "$1 needs libraries this machine lacks: $out"
    while read -r lib; do
        if [[ $(basename "$lib") == ld-linux* ]]; then
            [[ -e $rootfs/${lib#/} ]] || put "$lib" "$lib"
        elif [[ ! -e $rootfs/usr/lib/$TRIPLET/$(basename "$lib") ]]; then
            put "$lib" "/usr/lib/$TRIPLET/"
        fi
    done < <(awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) { print $i; break } }' <<<"$out")
}

# The CRIU crac would run (crac-cli's locate.rs): $CRAC_CRIU, else the first >= 4.2 of criu on
# PATH and the provisioned one.
criu_ok() {
    local v
    v=$("$1" --version 2>/dev/null | sed -n 's/^Version: *//p' | head -n 1) || return 1
    [[ $v =~ ^([0-9]+)\.([0-9]+) ]] || return 1
    ((BASH_REMATCH[1] > 4 || (BASH_REMATCH[1] == 4 && BASH_REMATCH[2] >= 2)))
}
criu=''
for candidate in ${CRAC_CRIU:-$(command -v criu) "${CRAC_CRIU_PREFIX:-/opt/crac-criu}/bin/criu"}; do
    if [[ -x $candidate ]] && criu_ok "$candidate"; then
        criu=$candidate
        break
    fi
done
[[ -n $criu ]] || die "no CRIU >= 4.2 found (run scripts/provision-criu.sh as root, or set CRAC_CRIU)"
# Merged /usr, as Debian lays it out: the loader is /lib64/ld-linux-x86-64.so.2.
for dir in lib lib64 bin sbin; do
    mkdir -p "$rootfs/usr/$dir"
    ln -s "usr/$dir" "$rootfs/$dir"
done
# The provisioned copy is a wrapper that runs a newer Debian's criu through that suite's own
# loader: the image gets that suite's files as its /usr, and so its C library.
if provisioned=$(sed -n 's/^R=\(\/.*\)$/\1/p' "$criu" 2>/dev/null) && [[ -n $provisioned && -d $provisioned/usr ]]; then
    info "CRIU: $criu (the provisioned copy in $provisioned, with its own C library)"
    cp -a "$provisioned/usr/." "$rootfs/usr/"
    if [[ -d $provisioned/lib ]]; then cp -a "$provisioned/lib/." "$rootfs/usr/lib/"; fi
    if [[ -d $provisioned/etc ]]; then cp -a "$provisioned/etc" "$rootfs/etc"; fi
else
    info "CRIU: $criu"
    is_elf "$(readlink -f "$criu")" ||
        die "$criu is not a CRIU program (a wrapper script?): name the binary itself in CRAC_CRIU"
    put "$criu" /usr/sbin/criu
    put_libraries "$criu"
fi
# crac, crac-action and the service, each with the libraries the image does not have yet.
put "$bin_dir/crac" /usr/local/bin/
put "$bin_dir/crac-action" /usr/local/bin/
if [[ -n $docker ]]; then
    put "$service" /app/service
else
    put "$service" /app/
fi
for bin in "$bin_dir/crac" "$bin_dir/crac-action" "$service"; do
    put_libraries "$bin"
done
# Debug information is most of a debug build's size, and no use in the image.
if command -v strip >/dev/null; then
    strip --strip-debug "$rootfs/usr/local/bin/crac" "$rootfs/usr/local/bin/crac-action" \
        "$rootfs"/app/*
fi
# Docker 20.10 gives a --user no ambient capabilities: crac carries the ones a container may
# hold as file capabilities (permitted, not effective, so that exec never fails where the
# container's bounding set lacks one), and passes on those it gets to CRIU.
xattrs=()
if [[ -n $docker && -n $user ]]; then
    command -v setcap >/dev/null || die "setcap not found (Debian's libcap2-bin has it)"
    setcap cap_sys_admin,cap_setpcap,cap_checkpoint_restore+ip "$rootfs/usr/local/bin/crac" ||
        die "cannot give $rootfs/usr/local/bin/crac its file capabilities (run as root)"
    xattrs=(--xattrs --xattrs-include=security.capability)
fi
mkdir -p "$rootfs"/{proc,dev,sys,run,tmp,var/lib/crac/images}
chmod 1777 "$rootfs/tmp"
# The store is the user's own: crac trusts a folder of root's or its own, and writes there.
[[ -z $user ]] || chown -R "$user" "$rootfs/var/lib/crac"

# The entrypoint, as a JSON array (of arguments without control characters).
for arg in "$name" "$@"; do
    [[ $arg != *[[:cntrl:]]* ]] || die "an argument holds a control character: $(printf '%q' "$arg")"
done
json() {
    local s=${1//\\/\\\\}
    printf '"%s"' "${s//\"/\\\"}"
}
# `--log -`: the service writes to crac run's stdout and stderr, which `podman logs` reads,
# restored or not.
entry="[$(json /usr/local/bin/crac),$(json run),$(json --log),$(json -),$(json --image)"
entry+=",$(json "$name"),$(json --)"
entry+=",$(json "/app/$(basename "$service")")"
for arg in "$@"; do entry+=",$(json "$arg")"; done
entry+="]"

tar -C "$rootfs" --numeric-owner "${xattrs[@]}" -cf "$tar" .
if [[ -n $docker ]]; then
    context=$(mktemp -d)
    trap 'rm -rf "$rootfs" "$context"; [[ -n $tar_out ]] || rm -f "$tar"' EXIT
    cp "$tar" "$context/rootfs.tar"
    cp "$ROOT/scripts/warm-start.Dockerfile" "$context/Dockerfile"
    out=$(DOCKER_BUILDKIT=0 "${engine[@]}" build --quiet --tag "$tag" "$context" 2>&1) ||
        die "docker build of $tag failed: $out"
    info "made $tag ($(du -sh "$rootfs" | cut -f1)) with scripts/warm-start.Dockerfile: run it with the command, e.g. /app/service $*"
    exit 0
fi
# CRAC_STORE: whoever runs crac in the container (root, or the --user) uses the image's store.
out=$("${engine[@]}" import --change "ENTRYPOINT $entry" \
    --change "ENV PATH=/usr/local/bin:/usr/bin:/usr/sbin" \
    --change "ENV CRAC_STORE=/var/lib/crac/images" "$tar" "$tag" 2>&1) ||
    die "podman import of $tar as $tag failed: $out"
info "made $tag ($(du -sh "$rootfs" | cut -f1)): entrypoint $entry"
