#!/usr/bin/env bash
# Build the runtime stage of ./Dockerfile on a local Debian base image and check the result, without pulling
# an image or running a container:
#
#   1. base     a stand-in for gcr.io/distroless/cc-debian12, made from Debian's packages: debootstrap
#               (--variant=minbase --download-only) fetches and verifies them, then the packages distroless
#               "cc" ships are unpacked, without docs, man pages, locales and gconv modules. The tarball is
#               cached, so later runs skip this step.
#   2. import   `podman import` of that tarball as a local image.
#   3. build    `podman build --target runtime` of ./Dockerfile itself: the runtime base comes in through
#               --build-arg RUNTIME_BASE, and the builder stage is replaced by a directory holding the
#               host-built binary (--build-context builder=DIR), so the rust image is never needed and the
#               runtime stage checked is the one that ships.
#   4. inspect  user is not root, entrypoint, cmd, exposed port, stop signal, size within the budget.
#   5. files    the binary and the config are in place, identical to their sources, root-owned, not writable
#               by the runtime user.
#   6. run      the image is mounted and the binary runs inside it with chroot, as the image's user:
#               `staybound --version` and `staybound check --config /etc/staybound/staybound.toml`.
#
# Usage: packaging/image-check.sh [options] [BINARY]
#   BINARY          the staybound binary to put in the image (default: target/release/staybound of the repo)
#   --skip-run      skip step 6 (for a binary that cannot run here)
#   --refresh-base  rebuild the cached base tarball (to pick up Debian updates)
#   --keep          keep the images it built (their names are printed) instead of removing them
#   --no-install    do not install missing tools with apt-get
#
# Environment:
#   STAYBOUND_CACHE_DIR     base tarball cache (default ${XDG_CACHE_HOME:-$HOME/.cache}/staybound)
#   STAYBOUND_BASE_SUITE    Debian release of the base (default bookworm: distroless cc-debian12 is Debian 12)
#   STAYBOUND_BASE_MIRROR   Debian mirror (default http://deb.debian.org/debian)
#   STAYBOUND_MAX_IMAGE_MB  image size budget in MB of 10^6 bytes (default 30)
#
# Needs root (debootstrap, image mount, chroot). Installs podman, debootstrap and debian-archive-keyring with
# apt-get when they are missing. Exits 0 when every check passed, 1 when one failed, 64 on bad usage.
set -Eeuo pipefail

PROG=image-check
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SUITE=${STAYBOUND_BASE_SUITE:-bookworm}
MIRROR=${STAYBOUND_BASE_MIRROR:-http://deb.debian.org/debian}
CACHE=${STAYBOUND_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/staybound}
MAX_MB=${STAYBOUND_MAX_IMAGE_MB:-30}

# What the runtime stage must look like (Dockerfile).
WANT_ENTRYPOINT='["/usr/local/bin/staybound"]'
WANT_CMD='["run","--config","/etc/staybound/staybound.toml"]'
WANT_PORT='9901/tcp'
WANT_STOPSIGNAL='SIGTERM'
IMG_BINARY=/usr/local/bin/staybound
IMG_CONFIG=/etc/staybound/staybound.toml
SRC_CONFIG=$REPO/config/image.toml

# The packages of gcr.io/distroless/cc-debian12 (base-debian12 plus the C/C++ runtime). Changing this list or
# BASE_RECIPE changes the cache key, so the base is rebuilt.
BASE_PACKAGES=(base-files netbase tzdata ca-certificates libc6 libgcc-s1 libgomp1 libstdc++6 libssl3)
BASE_RECIPE=2

RUN_BINARY=1 REFRESH_BASE=0 KEEP=0 INSTALL=1 BINARY=''

usage() { sed -n '/^# Usage:/,/^# Needs root/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while (($#)); do
    case $1 in
        --skip-run) RUN_BINARY=0 ;;
        --refresh-base) REFRESH_BASE=1 ;;
        --keep) KEEP=1 ;;
        --no-install) INSTALL=0 ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "$PROG: unknown option $1" >&2; usage >&2; exit 64 ;;
        *) [[ -z $BINARY ]] || { echo "$PROG: only one BINARY" >&2; exit 64; }; BINARY=$1 ;;
    esac
    shift
done
BINARY=${BINARY:-$REPO/target/release/staybound}

# ---- reporting, timing, cleanup --------------------------------------------------------------------------

RUN_ID="$$-$(date +%s)"
BASE_IMAGE="localhost/staybound-image-check-base:$RUN_ID"
IMAGE="localhost/staybound-image-check:$RUN_ID"
WORK='' MOUNTED=0 FAILED=0
TIMES=() STEP='' STEP_T0=''

say() { printf '%s: %s\n' "$PROG" "$*"; }
fail() { printf '%s: FAIL: %s\n' "$PROG" "$*" >&2; exit 1; }
ok() { printf '  ok    %s\n' "$*"; }
bad() { printf '  FAIL  %s\n' "$*" >&2; FAILED=$((FAILED + 1)); }
check() { # check DESCRIPTION COMMAND...: ok or bad, never exits
    local what=$1; shift
    if "$@"; then ok "$what"; else bad "$what"; fi
}
mb() { awk -v b="$1" 'BEGIN { printf "%.1f MB", b / 1e6 }'; }

step() { # step NAME: ends the running step (recording its time) and starts NAME; no NAME: just ends
    if [[ -n $STEP ]]; then
        TIMES+=("$(awk -v n="$STEP" -v a="$STEP_T0" -v b="$EPOCHREALTIME" 'BEGIN { printf "  %-10s %7.1f s", n, b - a }')")
    fi
    STEP=${1:-} STEP_T0=$EPOCHREALTIME
    [[ -z $STEP ]] || printf '\n== %s\n' "$STEP"
}

cleanup() {
    local rc=$?
    set +e
    trap - ERR
    step cleanup
    if ((MOUNTED)); then podman image unmount "$IMAGE" >/dev/null; fi
    if ((KEEP)); then
        say "kept images $IMAGE and $BASE_IMAGE"
    elif command -v podman >/dev/null; then
        local img
        for img in "$IMAGE" "$BASE_IMAGE"; do
            if podman image exists "$img"; then podman rmi "$img" >/dev/null; fi
        done
    fi
    [[ -z $WORK ]] || rm -rf -- "$WORK"
    step
    printf '\ntimes:\n'
    printf '%s\n' "${TIMES[@]}"
    if ((rc == 0)); then say "PASS"; else say "FAILED (exit $rc)" >&2; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'fail "line $LINENO: $BASH_COMMAND"' ERR

# ---- 0. tools --------------------------------------------------------------------------------------------

step tools
((EUID == 0)) || fail "needs root: debootstrap, podman image mount and chroot"
[[ -f $REPO/Dockerfile ]] || fail "no Dockerfile in $REPO"
[[ -f $SRC_CONFIG ]] || fail "no $SRC_CONFIG: the image ships it as $IMG_CONFIG"
[[ -f $BINARY && -x $BINARY ]] || fail "no executable binary at $BINARY (build it, or pass its path)"
if ((RUN_BINARY)) && [[ $(head -c 4 "$BINARY" | od -An -c | tr -d ' ') != '177ELF' ]]; then
    fail "$BINARY is not an ELF executable (use --skip-run for a stand-in that is not)"
fi

ARCH=$(dpkg --print-architecture 2>/dev/null || true)
if [[ -z $ARCH ]]; then
    case $(uname -m) in x86_64) ARCH=amd64 ;; aarch64) ARCH=arm64 ;; *) fail "unknown architecture $(uname -m)" ;; esac
fi
KEY=$(printf '%s\n' "$BASE_RECIPE" "$SUITE" "$ARCH" "${BASE_PACKAGES[@]}" | sha256sum | cut -c1-12)
BASE_TAR="$CACHE/base-$SUITE-$ARCH-$KEY.tar"
NEED_BASE=1
if [[ -f $BASE_TAR ]] && ((!REFRESH_BASE)); then NEED_BASE=0; fi

missing=()
command -v podman >/dev/null || missing+=(podman)
if ((NEED_BASE)); then
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    [[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]] || missing+=(debian-archive-keyring)
fi
if ((${#missing[@]})); then
    if ((!INSTALL)) || ! command -v apt-get >/dev/null; then
        fail "missing: ${missing[*]} (install them, or drop --no-install)"
    fi
    say "installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
fi
say "podman $(podman --version | awk '{print $NF}'), arch $ARCH, binary $BINARY ($(mb "$(stat -c %s "$BINARY")"))"

WORK=$(mktemp -d "${TMPDIR:-/tmp}/staybound-image-check.XXXXXX")

# ---- 1. base tarball ---------------------------------------------------------------------------------------

build_base() {
    local root=$WORK/debootstrap tree=$WORK/base includes pkg debs t0
    includes=$(IFS=,; echo "${BASE_PACKAGES[*]}")
    # debootstrap resolves the release's packages and verifies them against its signed Release file.
    # --download-only: the image is assembled below the way distroless is, from the packages' contents
    # without their maintainer scripts, so installing the whole minbase system would be wasted time.
    say "debootstrap --variant=minbase --download-only $SUITE from $MIRROR"
    t0=$EPOCHREALTIME
    if ! debootstrap --variant=minbase --download-only --arch="$ARCH" --include="$includes" \
        --keyring=/usr/share/keyrings/debian-archive-keyring.gpg \
        "$SUITE" "$root" "$MIRROR" >"$WORK/debootstrap.log" 2>&1; then
        tail -n 25 "$WORK/debootstrap.log" >&2
        fail "debootstrap failed (log above)"
    fi
    say "debootstrap took $(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f s", b - a }')"

    mkdir -p "$tree"
    for pkg in "${BASE_PACKAGES[@]}"; do
        shopt -s nullglob
        debs=("$root/var/cache/apt/archives/${pkg}_"*_{"$ARCH",all}.deb)
        shopt -u nullglob
        ((${#debs[@]} == 1)) || fail "expected one package file for $pkg, found ${#debs[@]}"
        dpkg-deb --extract "${debs[0]}" "$tree"
        say "  $(basename "${debs[0]}")"
    done

    # What maintainer scripts would have generated: the CA bundle (update-ca-certificates).
    mkdir -p "$tree/etc/ssl/certs"
    find "$tree/usr/share/ca-certificates" -name '*.crt' -print0 | LC_ALL=C sort -z | xargs -0 cat \
        >"$tree/etc/ssl/certs/ca-certificates.crt"
    [[ -s $tree/etc/ssl/certs/ca-certificates.crt ]] || fail "no CA certificates in the base"

    # Slim down: no docs (copyright files stay), man pages, locales, charset converters, and no single
    # certificates besides the bundle.
    rm -rf "$tree"/usr/share/{man,info,locale,lintian,linda,bug,ca-certificates} "$tree"/usr/lib/*-linux-gnu/gconv
    [[ ! -d $tree/usr/share/doc ]] || find "$tree/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete

    # Users as distroless has them; no shells.
    printf '%s\n' 'root:x:0:0:root:/root:/sbin/nologin' \
        'nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin' \
        'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$tree/etc/passwd"
    printf '%s\n' 'root:x:0:' 'nobody:x:65534:' 'nonroot:x:65532:' >"$tree/etc/group"
    printf '%s\n' 'passwd: files' 'group: files' 'hosts: files dns' 'networks: files' \
        'protocols: files' 'services: files' >"$tree/etc/nsswitch.conf"
    mkdir -p "$tree"/{tmp,root,home/nonroot,proc,sys,dev,run}
    chmod 1777 "$tree/tmp"
    chmod 0700 "$tree/root" "$tree/home/nonroot"
    chown 65532:65532 "$tree/home/nonroot"

    mkdir -p "$CACHE"
    tar -C "$tree" --numeric-owner --sort=name -cf "$BASE_TAR.partial" .
    mv -f "$BASE_TAR.partial" "$BASE_TAR"
    rm -rf "$root" "$tree"
    # Earlier recipes' tarballs for this release and architecture are stale now.
    find "$CACHE" -maxdepth 1 -name "base-$SUITE-$ARCH-*.tar" ! -name "${BASE_TAR##*/}" -delete
}

step base
if ((NEED_BASE)); then
    build_base
    say "built $BASE_TAR ($(mb "$(stat -c %s "$BASE_TAR")"))"
else
    say "cached $BASE_TAR ($(mb "$(stat -c %s "$BASE_TAR")"), from $(date -r "$BASE_TAR" +%F); --refresh-base rebuilds it)"
fi

# ---- 2. import ---------------------------------------------------------------------------------------------

step import
# No USER here: the check below must see the Dockerfile's own USER line, not one inherited from the base.
podman import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    "$BASE_TAR" "$BASE_IMAGE" >/dev/null
BASE_SIZE=$(podman image inspect --format '{{.Size}}' "$BASE_IMAGE")
say "$BASE_IMAGE: $(mb "$BASE_SIZE")"

# ---- 3. build ----------------------------------------------------------------------------------------------

step build
# The Dockerfile's runtime stage copies /out/staybound from the builder stage.
install -D -m 0755 "$BINARY" "$WORK/builder/out/staybound"
podman build --pull=never --layers=false --target runtime \
    --build-arg RUNTIME_BASE="$BASE_IMAGE" \
    --build-context builder="$WORK/builder" \
    --file "$REPO/Dockerfile" --tag "$IMAGE" "$REPO"

# ---- 4. inspect --------------------------------------------------------------------------------------------

step inspect
conf() { podman image inspect --format "$1" "$IMAGE"; }
USER_SPEC=$(conf '{{.Config.User}}')
ENTRYPOINT=$(conf '{{json .Config.Entrypoint}}')
CMD=$(conf '{{json .Config.Cmd}}')
PORTS=$(conf '{{json .Config.ExposedPorts}}')
STOPSIGNAL=$(conf '{{.Config.StopSignal}}')
SIZE=$(conf '{{.Size}}')
not_root() { [[ -n $1 && ${1%%:*} != 0 && ${1%%:*} != root ]]; }
has_port() { [[ $1 == *"\"$2\""* ]]; }
check "user is not root (User=${USER_SPEC:-unset})" not_root "$USER_SPEC"
check "entrypoint $ENTRYPOINT" test "$ENTRYPOINT" = "$WANT_ENTRYPOINT"
check "cmd $CMD" test "$CMD" = "$WANT_CMD"
check "exposes $WANT_PORT (${PORTS})" has_port "$PORTS" "$WANT_PORT"
check "stop signal ${STOPSIGNAL:-unset}" test "$STOPSIGNAL" = "$WANT_STOPSIGNAL"
check "size $(mb "$SIZE") <= $MAX_MB MB (base $(mb "$BASE_SIZE") + $(mb $((SIZE - BASE_SIZE))) added)" \
    test "$SIZE" -le $((MAX_MB * 1000 * 1000))

# ---- 5. files ----------------------------------------------------------------------------------------------

step files
MNT=$(podman image mount "$IMAGE")
MOUNTED=1
[[ -d $MNT ]] || fail "podman image mount gave no directory"
# The image's user as uid:gid, names looked up in the image's own /etc/passwd and /etc/group.
lookup() { # lookup FILE NAME_OR_ID
    if [[ $2 =~ ^[0-9]+$ ]]; then echo "$2"; else awk -F: -v n="$2" '$1 == n { print $3; exit }' "$1"; fi
}
RUN_UID=$(lookup "$MNT/etc/passwd" "${USER_SPEC%%:*}")
if [[ $USER_SPEC == *:* ]]; then
    RUN_GID=$(lookup "$MNT/etc/group" "${USER_SPEC#*:}")
else
    RUN_GID=$(awk -F: -v u="$RUN_UID" '$3 == u { print $4; exit }' "$MNT/etc/passwd")
fi
check "user $USER_SPEC resolves to uid:gid ${RUN_UID:-?}:${RUN_GID:-?}" test -n "$RUN_UID" -a -n "$RUN_GID"
check "$IMG_BINARY is an executable file" test -f "$MNT$IMG_BINARY" -a -x "$MNT$IMG_BINARY"
check "$IMG_BINARY is the given binary" cmp -s "$BINARY" "$MNT$IMG_BINARY"
check "$IMG_CONFIG is config/image.toml" cmp -s "$SRC_CONFIG" "$MNT$IMG_CONFIG"
locked_down() { # root-owned, nobody else may write, the config readable by the runtime user
    local bin=$MNT$IMG_BINARY cfg=$MNT$IMG_CONFIG
    [[ $(stat -c %u "$bin" "$cfg" "${cfg%/*}" | sort -u) == 0 ]] &&
        [[ -z $(find "$bin" "${cfg%/*}" -perm /022) ]] &&
        [[ -n $(find "$cfg" -perm -004) && -n $(find "${cfg%/*}" -perm -001) ]]
}
check "binary and config are root-owned, not writable by others, config readable by all" locked_down

# ---- 6. run ------------------------------------------------------------------------------------------------

step run
if ((RUN_BINARY)) && [[ -n $RUN_UID && -n $RUN_GID ]]; then
    in_image() { # in_image ARGS...: run the image's binary in the mounted image, as the image's user
        local out rc=0
        out=$(env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            timeout 60 chroot --userspec="$RUN_UID:$RUN_GID" "$MNT" "$IMG_BINARY" "$@" 2>&1) || rc=$?
        [[ -z $out ]] || printf '%s\n' "$out" | sed 's/^/        | /'
        return "$rc"
    }
    check "staybound --version runs in the image as $RUN_UID:$RUN_GID" in_image --version
    check "staybound check --config $IMG_CONFIG exits 0" in_image check --config "$IMG_CONFIG"
elif ((RUN_BINARY)); then
    bad "not run: the image's user could not be resolved"
else
    say "skipped (--skip-run)"
fi

step
printf '\nsummary: image %s, base %s, binary %s, budget %s MB; %d check(s) failed\n' \
    "$(mb "$SIZE")" "$(mb "$BASE_SIZE")" "$(mb "$(stat -c %s "$BINARY")")" "$MAX_MB" "$FAILED"
((FAILED == 0)) || exit 1
