#!/bin/bash
# Build the runner's container image from Debian packages, without pulling a base image.
#
#   deploy/build-image.sh [--tag NAME]      # prints the image reference on its last line
#
# Two cached stages, each keyed by the content that shapes it:
#   1. base image  localhost/vmdriver-runner-base:<key>
#      a debootstrap minbase root (Debian 12) with QEMU, OVMF, swtpm, mtools, nftables and
#      a Python venv holding vmdriver's dependencies. Key: this script, deploy/packages.txt,
#      the dependency list of pyproject.toml.
#   2. image       localhost/vmdriver-runner:<key>
#      the base plus a vmdriver wheel built from the committed tree (git archive HEAD,
#      so nobody's uncommitted work leaks into an image). Key: base key + the git tree
#      of vmdriver/ and pyproject.toml.
# A stage whose image already exists is skipped, so a rebuild of the same content
# takes about a second. Needs root, debootstrap, buildah and git.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${VMDRIVER_IMAGE_CACHE:-/var/cache/vmdriver/image}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
NAME=localhost/vmdriver-runner
TAG_ALIAS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --tag) TAG_ALIAS=$2; shift 2 ;;
        *) echo "usage: $0 [--tag NAME]" >&2; exit 2 ;;
    esac
done

log() { echo "build-image: $*" >&2; }
hash_of() { sha256sum | cut -c1-16; }

packages=$(grep -v '^\s*#' "$REPO/deploy/packages.txt" | xargs | tr ' ' ',')
# Only the dependency list shapes the base venv, not the rest of pyproject.toml.
deps=$(sed -n '/^dependencies = \[/,/^\]/p' "$REPO/pyproject.toml")
base_key=$( { cat "$0" "$REPO/deploy/packages.txt"; echo "$deps" "$SUITE"; } | hash_of)
tree=$(git -C "$REPO" rev-parse HEAD:vmdriver HEAD:pyproject.toml | xargs)
key=$(echo "$base_key $tree" | hash_of)
base_ref=$NAME-base:$base_key
ref=$NAME:$key

exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }

build_wheels() {
    # Dependencies as wheels for the image's CPython 3.11 (Debian 12: same glibc as here).
    local out=$1 src
    src=$(mktemp -d)
    git -C "$REPO" archive HEAD | tar -x -C "$src"
    "$REPO/.venv/bin/pip" wheel --quiet --no-build-isolation -w "$out" "$src" >&2
    rm -rf "$src"
}

build_rootfs() {
    local root=$1
    mkdir -p "$CACHE/debs"
    log "debootstrap $SUITE minbase with: $packages"
    debootstrap --variant=minbase --include="$packages" --cache-dir="$CACHE/debs" \
        "$SUITE" "$root" "$MIRROR" >&2
    # qemu-bridge-helper attaches taps to host bridges (VM-Operator's images do the same).
    mkdir -p "$root/etc/qemu"
    echo "allow all" >"$root/etc/qemu/bridge.conf"
    chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc \
        "$root"/usr/share/man "$root"/usr/share/locale
}

build_base() {
    local work root wheels ctr
    work=$(mktemp -d "$CACHE/work.XXXXXX")
    trap 'rm -rf "$work"' RETURN
    root=$work/root
    wheels=$work/wheels
    build_rootfs "$root"
    build_wheels "$wheels"
    # Dependencies only: vmdriver itself goes into the top layer.
    cp -r "$wheels" "$root/tmp/wheels"
    # System site packages: Debian's python3-nftables exists nowhere else.
    chroot "$root" python3 -m venv --system-site-packages /opt/vmdriver
    local deplist
    deplist=$(cd "$wheels" && ls | grep -v '^vmdriver-' | sed 's/-.*//' | xargs)
    # shellcheck disable=SC2086
    chroot "$root" /opt/vmdriver/bin/pip install --quiet --no-index --find-links /tmp/wheels $deplist >&2
    rm -rf "$root/tmp/wheels" "$root/root/.cache"
    ctr=$(buildah from scratch)
    buildah copy --quiet "$ctr" "$root" / >/dev/null
    buildah config --env PATH=/opt/vmdriver/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --label org.opencontainers.image.source=vmdriver "$ctr"
    buildah commit --quiet "$ctr" "$base_ref" >/dev/null
    buildah rm "$ctr" >/dev/null
}

build_top() {
    local work ctr
    work=$(mktemp -d "$CACHE/work.XXXXXX")
    trap 'rm -rf "$work"' RETURN
    build_wheels "$work/wheels"
    ctr=$(buildah from --quiet "$base_ref")
    buildah copy --quiet "$ctr" "$work/wheels" /tmp/wheels >/dev/null
    buildah run "$ctr" -- /opt/vmdriver/bin/pip install --quiet --no-index --no-deps \
        --find-links /tmp/wheels vmdriver >&2
    buildah run "$ctr" -- rm -rf /tmp/wheels /root/.cache
    buildah config --entrypoint '["vmdriver", "runner"]' --cmd '[]' \
        --volume /etc/opt/vmrunner --volume /var/local/vm-data \
        --label "org.opencontainers.image.revision=$tree" "$ctr"
    buildah commit --quiet "$ctr" "$ref" >/dev/null
    buildah rm "$ctr" >/dev/null
}

prune() {
    # Keep the 3 newest images of a name (each commit makes a new top layer).
    buildah images --noheading --format '{{.CreatedAtRaw}}|{{.Name}}:{{.Tag}}' |
        grep -F "|$1:" | sort -r | tail -n +4 | cut -d'|' -f2 | while read -r old; do
            if [ "$old" != "$ref" ] && [ "$old" != "$base_ref" ]; then
                buildah rmi "$old" >/dev/null 2>&1 || true
            fi
        done
}

mkdir -p "$CACHE"
if exists "$base_ref"; then log "base $base_ref cached"; else build_base; fi
if exists "$ref"; then log "image $ref cached"; else build_top; fi
prune "$NAME"
prune "$NAME-base"
[ -n "$TAG_ALIAS" ] && buildah tag "$ref" "$TAG_ALIAS"
echo "$ref"
