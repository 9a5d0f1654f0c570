#!/usr/bin/env bash
# Provision a CRIU >= 4.2 for crac-rs on Debian 12, without touching the system's packages.
#
# Why: Debian 12's criu (3.17) cannot even start on kernels >= 6.13 ("vdso: Unexpected rt vDSO
# area bounds"; fixed in CRIU 4.1), and CRIU 4.1 (Debian 13) cannot dump a process holding any
# TCP or UDP socket on recent kernels ("Can't get 1:16 opt": SO_PASSCRED on an inet socket;
# fixed in 4.2). Debian forky/sid ship criu 4.2.x, but installing it with apt would upgrade libc
# and much of the system. So this script fetches those packages with apt's own client into a
# private folder (private sources, lists, cache and config; /etc/apt is only read), unpacks
# them with dpkg-deb, and installs a wrapper that runs criu through that suite's own dynamic
# loader.
#
# Suites move: the first of CRAC_CRIU_SUITES whose criu is >= 4.2 is used, and the script fails,
# saying what each suite has, when none is. Verified here: criu 4.2.1 from forky and sid.
#
# Usage: scripts/provision-criu.sh [--force]      (as root)
#   CRAC_CRIU_PREFIX  install prefix (default /opt/crac-criu): PREFIX/bin/criu is the wrapper,
#                     PREFIX/root the unpacked packages, PREFIX/apt apt's private state and cache.
#   CRAC_CRIU         if this already names a working CRIU >= 4.2, there is nothing to do.
#   CRAC_CRIU_SUITES  Debian suites to take criu from, in order of preference (default
#                     "forky sid"): the first with a criu >= 4.2 wins.
#   CRAC_CRIU_MIRROR  Debian mirror URI (default: the one this machine's apt sources use).
#   CRAC_CRIU_KEYRING keyring that verifies those suites' archive
#                     (default /usr/share/keyrings/debian-archive-keyring.gpg).
#   --force           reinstall even if PREFIX/bin/criu already is CRIU >= 4.2.
set -euo pipefail

PREFIX=${CRAC_CRIU_PREFIX:-/opt/crac-criu}
SUITES=${CRAC_CRIU_SUITES:-forky sid}
MIN_VERSION=4.2
KEYRING=${CRAC_CRIU_KEYRING:-/usr/share/keyrings/debian-archive-keyring.gpg}
TRIPLET=x86_64-linux-gnu
LOADER=usr/lib/$TRIPLET/ld-linux-x86-64.so.2   # relative to the unpacked root

info() { printf 'provision-criu: %s\n' "$*"; }
die() {
    printf 'provision-criu: error: %s\n' "$*" >&2
    exit 1
}

force=0
for arg in "$@"; do
    case $arg in
        --force) force=1 ;;
        -h | --help)
            sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
            exit 0
            ;;
        *) die "unknown argument '$arg' (try --help)" ;;
    esac
done

# Prints the version a CRIU binary (or wrapper) reports, or nothing if it does not run.
criu_version() {
    "$1" --version 2>/dev/null | sed -n 's/^Version: *//p' | head -n 1 || true
}

# True if version $1 (X.Y[.Z...]) is >= MIN_VERSION.
version_ok() {
    local maj min want_maj want_min
    IFS=. read -r maj min _ <<<"$1."
    IFS=. read -r want_maj want_min _ <<<"$MIN_VERSION."
    [[ $maj =~ ^[0-9]+$ && $min =~ ^[0-9]+$ ]] || return 1
    ((maj > want_maj || (maj == want_maj && min >= want_min)))
}

# --- Nothing to do? (cheap checks first; they need no root) ---------------------------------

if [[ -n ${CRAC_CRIU:-} ]]; then
    v=$(criu_version "$CRAC_CRIU")
    if [[ -n $v ]] && version_ok "$v"; then
        info "CRAC_CRIU=$CRAC_CRIU is CRIU $v (>= $MIN_VERSION); nothing to install."
        exit 0
    fi
    info "warning: CRAC_CRIU=$CRAC_CRIU is not a working CRIU >= $MIN_VERSION (version: '${v:-none}');" \
        "installing into $PREFIX anyway (unset CRAC_CRIU or point it at $PREFIX/bin/criu)."
fi

# The prefix is baked into the wrapper and into apt's config file: keep it to plain path
# characters so that no quoting can go wrong there.
[[ $PREFIX =~ ^/[A-Za-z0-9._/+-]*$ ]] ||
    die "CRAC_CRIU_PREFIX must be an absolute path of letters, digits and ._/+- (got '$PREFIX')"
PREFIX=${PREFIX%/}
WRAPPER=$PREFIX/bin/criu

installed_ok() {
    [[ -x $WRAPPER ]] || return 1
    v=$(criu_version "$WRAPPER")
    [[ -n $v ]] && version_ok "$v"
}

if ((!force)) && installed_ok; then
    info "CRIU $v already installed at $WRAPPER; nothing to do (--force reinstalls)."
    exit 0
fi

# --- Preconditions ---------------------------------------------------------------------------

if ((EUID != 0)); then
    # sudo drops the environment, so spell the prefix out in the suggested command.
    sudo_cmd="sudo $0"
    if [[ -n ${CRAC_CRIU_PREFIX:-} ]]; then sudo_cmd="sudo CRAC_CRIU_PREFIX=$PREFIX $0"; fi
    die "must run as root (it installs into $PREFIX, and apt's fetch runs as root)." \
        "Run: $sudo_cmd   (CRIU itself needs root to dump and restore anyway.)"
fi
for tool in apt-get apt-cache apt-config dpkg dpkg-deb; do
    command -v "$tool" >/dev/null || die "'$tool' not found: this script needs a Debian-based system."
done
arch=$(dpkg --print-architecture)
[[ $arch == amd64 ]] || die "only amd64 is supported (this machine is $arch)."
[[ -r $KEYRING ]] || die "keyring $KEYRING not found: install debian-archive-keyring," \
    "or set CRAC_CRIU_KEYRING to a keyring holding the current Debian archive keys."

start=$SECONDS
APTDIR=$PREFIX/apt
mkdir -p "$PREFIX/bin" "$APTDIR"

# Serialise concurrent runs (e.g. parallel test jobs); then look again, since the run we
# waited for may just have installed it.
if command -v flock >/dev/null; then
    exec 9>"$PREFIX/.provision.lock"
    flock 9
    if ((!force)) && installed_ok; then
        info "CRIU $v was installed at $WRAPPER by a concurrent run; nothing to do."
        exit 0
    fi
fi

STAGE=$PREFIX/root.new.$$
OLD=$PREFIX/root.old.$$
cleanup() { rm -rf "$STAGE" "$OLD" "$WRAPPER.new.$$"; }
trap cleanup EXIT

# --- Which mirror? Take the one this machine already uses, so no host name lives in the repo ---

# Prints the first URI of an enabled "deb" entry for a release suite (not -updates, -security,
# -backports) with component main, from deb822 .sources files.
mirror_from_deb822() {
    awk '
        function flush(   n, i, s, u, ok) {
            if (!found && types ~ /(^| )deb( |$)/ && tolower(enabled) !~ /^(no|false|0)$/ &&
                comps ~ /(^| )main( |$)/) {
                n = split(suites, s, " ")
                for (i = 1; i <= n; i++) if (s[i] !~ /[-\/]/) ok = 1
                if (ok && split(uris, u, " ") > 0) { print u[1]; found = 1 }
            }
            types = suites = comps = uris = enabled = key = ""
        }
        function set(k, v) {
            gsub(/[ \t]+/, " ", v); sub(/^ /, "", v); sub(/ $/, "", v)
            if (k == "types") types = types " " v
            else if (k == "suites") suites = suites " " v
            else if (k == "components") comps = comps " " v
            else if (k == "uris") uris = uris " " v
            else if (k == "enabled") enabled = v
        }
        FNR == 1        { flush() }
        /^[ \t]*#/      { next }
        /^[ \t]*$/      { flush(); next }
        /^[ \t]/        { set(key, $0); next }    # continuation line
        index($0, ":")  { key = tolower(substr($0, 1, index($0, ":") - 1))
                          set(key, substr($0, index($0, ":") + 1)) }
        END             { flush() }
    ' "$@"
}

# Same for one-line "deb [options] URI suite components..." files.
mirror_from_list() {
    awk '
        $1 == "deb" {
            i = 2
            if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
            if ($(i + 1) ~ /[-\/]/) next
            for (j = i + 2; j <= NF; j++) if ($j == "main") { print $i; exit }
        }
    ' "$@"
}

mirror=${CRAC_CRIU_MIRROR:-}
if [[ -z $mirror ]]; then
    shopt -s nullglob
    deb822=(/etc/apt/sources.list.d/*.sources)
    lists=(/etc/apt/sources.list /etc/apt/sources.list.d/*.list)
    shopt -u nullglob
    if ((${#deb822[@]})); then
        mirror=$(mirror_from_deb822 "${deb822[@]}" | head -n 1)
    fi
    if [[ -z $mirror ]]; then
        for f in "${lists[@]}"; do
            if [[ -r $f ]]; then mirror=$(mirror_from_list "$f"); fi
            if [[ -n $mirror ]]; then break; fi
        done
    fi
    [[ -n $mirror ]] || die "found no Debian mirror in /etc/apt/sources.list{,.d}: set CRAC_CRIU_MIRROR" \
        "to a Debian archive URI (the kind that has dists/sid/ under it)."
fi

# --- A private apt: its own config, sources, lists and cache, all under PREFIX/apt ---------------

mkdir -p "$APTDIR"/etc/{apt.conf.d,sources.list.d,preferences.d} \
    "$APTDIR"/state/lists/partial "$APTDIR"/cache/archives/partial "$APTDIR"/log "$APTDIR"/debs
: >"$APTDIR/state/status" # no installed packages: apt must not reason about the host's

# APT_CONFIG is read before the host's apt.conf.d, so it can point Dir::Etc::parts and
# Dir::Etc::main away: the host's hooks (apt.conf.d Post-Invoke, cache cleaners, AppStream),
# pins and sources then do not apply to this private apt. Only the host's network settings
# (Acquire::*: proxies, date checks) are carried over, as they describe this machine.
APTCONF=$APTDIR/apt.conf
{
    echo "// Generated by scripts/provision-criu.sh: a private apt for fetching Debian packages of one suite."
    APT_CONFIG=${APT_CONFIG:-} apt-config dump Acquire | grep -v -e '^Acquire::IndexTargets' -e '^Acquire::Languages' || true
    cat <<EOF
Acquire::Languages "none";
Acquire::GzipIndexes "true";
Dir::Etc "$APTDIR/etc";
Dir::Etc::main "/dev/null";
Dir::Etc::parts "$APTDIR/etc/apt.conf.d";
Dir::Etc::sourcelist "/dev/null";
Dir::Etc::sourceparts "$APTDIR/etc/sources.list.d";
Dir::Etc::preferences "/dev/null";
Dir::Etc::preferencesparts "$APTDIR/etc/preferences.d";
Dir::Etc::netrc "/etc/apt/auth.conf";
Dir::Etc::netrcparts "/etc/apt/auth.conf.d";
Dir::State "$APTDIR/state";
Dir::State::lists "lists/";
Dir::State::status "$APTDIR/state/status";
Dir::Cache "$APTDIR/cache";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
Dir::Log "$APTDIR/log";
APT::Architecture "$arch";
APT::Architectures { "$arch"; };
EOF
} >"$APTCONF.new"
mv -f "$APTCONF.new" "$APTCONF"

papt() { APT_CONFIG=$APTCONF "$@"; }

# One suite at a time, so that criu's dependency closure comes from one suite alone. update is
# cheap when the lists are already there (If-Modified-Since). The Release file is verified
# against KEYRING (Debian 12's debian-archive-keyring has the keys that sign forky and sid).
found=()
SUITE=
for suite in $SUITES; do
    [[ $suite =~ ^[a-z0-9-]+$ ]] || die "CRAC_CRIU_SUITES holds '$suite', which is not a Debian suite name"
    rm -f "$APTDIR"/etc/sources.list.d/*.sources
    cat >"$APTDIR/etc/sources.list.d/$suite.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $suite
Components: main
Signed-By: $KEYRING
EOF
    info "looking for criu >= $MIN_VERSION in Debian $suite at $mirror (keyring $KEYRING)"
    if ! out=$(papt apt-get -q update 2>&1) || grep -q -e '^W:' -e '^E:' <<<"$out"; then
        printf '%s\n' "$out" >&2
        die "'apt-get update' for $suite failed or warned (see above). If it is a signature problem" \
            "(NO_PUBKEY), update debian-archive-keyring or set CRAC_CRIU_KEYRING."
    fi
    candidate=$(papt apt-cache policy criu | sed -n 's/^ *Candidate: *//p')
    upstream=${candidate#*:}
    upstream=${upstream%%-*}
    if [[ -n $candidate && $candidate != "(none)" ]] && version_ok "$upstream"; then
        SUITE=$suite
        info "Debian $suite has criu $candidate"
        break
    fi
    found+=("$suite: ${candidate:-no criu}")
done
[[ -n $SUITE ]] || die "no suite of '$SUITES' has a criu >= $MIN_VERSION any more (${found[*]})." \
    "Set CRAC_CRIU_SUITES to a Debian suite that has one, or CRAC_CRIU to a CRIU >= $MIN_VERSION built by hand."

# Packages: criu and everything it depends on, recursively (Depends and Pre-Depends only).
# With an empty status file this is the complete closure: libc6 and the libraries of the suite.
deps=$(papt apt-cache depends --recurse --no-recommends --no-suggests --no-conflicts \
    --no-breaks --no-replaces --no-enhances criu)
mapfile -t pkgs < <(awk '!/^[ <]/' <<<"$deps" | sort -u)
((${#pkgs[@]} > 1)) || die "could not resolve criu's dependencies in $SUITE: $deps"

# Exact file names of the candidate versions, so that stale downloads can be told apart.
uris=$(papt apt-get download --print-uris "${pkgs[@]}")
mapfile -t debs < <(awk '{ print $2 }' <<<"$uris")
((${#debs[@]} == ${#pkgs[@]})) || die "unexpected 'apt-get download --print-uris' output: $uris"

# apt downloads as the unprivileged _apt user: let it write into the download folder.
if getent passwd _apt >/dev/null; then chown _apt:root "$APTDIR/debs"; fi
(cd "$APTDIR/debs" && papt apt-get -q download "${pkgs[@]}" >/dev/null) ||
    die "downloading ${pkgs[*]} from $mirror failed."
# Drop files of versions that are no longer the candidates, so the cache does not grow forever.
for f in "$APTDIR"/debs/*.deb; do
    keep=0
    for d in "${debs[@]}"; do if [[ ${f##*/} == "$d" ]]; then keep=1; fi; done
    ((keep)) || rm -f "$f"
done

# --- Unpack into a staging root, check it, then swap it in ------------------------------------

rm -rf "$STAGE"
mkdir -p "$STAGE"
for d in "${debs[@]}"; do
    dpkg-deb -x "$APTDIR/debs/$d" "$STAGE"
done
printf '%s\n' "${debs[@]}" >"$STAGE/.crac-criu-packages" # what is installed, for humans

libpath=$STAGE/usr/lib/$TRIPLET:$STAGE/lib/$TRIPLET
[[ -x $STAGE/$LOADER && -x $STAGE/usr/sbin/criu ]] || die "unpacked packages lack $LOADER or usr/sbin/criu."
# Every shared library must come from the unpacked root: a missing one would otherwise be
# found (silently) among the host's older libraries via ld.so.cache.
linked=$("$STAGE/$LOADER" --library-path "$libpath" --list "$STAGE/usr/sbin/criu") ||
    die "$SUITE's loader cannot load criu: $linked"
foreign=$(awk -v root="$STAGE/" '/=>/ && index($3, root) != 1' <<<"$linked")
[[ -z $foreign ]] || die "criu needs libraries the $SUITE packages above do not provide:"$'\n'"$foreign"
v=$("$STAGE/$LOADER" --library-path "$libpath" "$STAGE/usr/sbin/criu" --version | sed -n 's/^Version: *//p')
version_ok "$v" || die "$SUITE's criu is version '$v', not >= $MIN_VERSION."

if [[ -e $PREFIX/root ]]; then mv "$PREFIX/root" "$OLD"; fi
mv "$STAGE" "$PREFIX/root"

# The wrapper runs criu through the suite's loader with --library-path, NOT LD_LIBRARY_PATH: CRIU's
# environment is inherited by the programs it runs (action scripts, built against the host's
# libc), and an LD_LIBRARY_PATH pointing at the newer libc would leak into them.
cat >"$WRAPPER.new.$$" <<EOF
#!/bin/sh
# CRIU $v from Debian $SUITE, installed by scripts/provision-criu.sh (packages: $PREFIX/root/.crac-criu-packages).
# Runs through $SUITE's own loader with --library-path (not LD_LIBRARY_PATH, which programs
# that CRIU starts, such as action scripts, would inherit).
R=$PREFIX/root
exec "\$R/$LOADER" --library-path "\$R/usr/lib/$TRIPLET:\$R/lib/$TRIPLET" "\$R/usr/sbin/criu" "\$@"
EOF
chmod 755 "$WRAPPER.new.$$"
mv -f "$WRAPPER.new.$$" "$WRAPPER"
rm -rf "$OLD"
info "installed CRIU $v (${#debs[@]} $SUITE packages) at $WRAPPER in $((SECONDS - start)) s"

# --- Does it work on this kernel? -------------------------------------------------------------

rc=0
check=$("$WRAPPER" check 2>&1) || rc=$?
printf '%s\n' "$check" | sed 's/^/  criu check: /'
if ((rc != 0)) || ! grep -qx 'Looks good\.' <<<"$check"; then
    die "'$WRAPPER check' did not say 'Looks good.' (exit code $rc): CRIU $v cannot checkpoint" \
        "on this kernel as configured; see its output above."
fi
info "OK: $WRAPPER (CRIU $v) says 'Looks good.'"
