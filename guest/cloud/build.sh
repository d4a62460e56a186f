#!/bin/bash
# Builds vmdriver's Debian 12 cloud guest: a qcow2 disk image made only from
# Debian packages (debootstrap), booted by SeaBIOS from its own MBR like a
# downloaded cloud image, configured at first boot by cloud-init (NoCloud).
#   disk.qcow2, manifest.json
# into ${VMDRIVER_CLOUD_GUEST_CACHE:-/var/cache/vmdriver/cloud-guest}/<content key>,
# points guest/cloud/out at it and prints that directory as the last stdout line.
# Run as root on Debian 12. Progress goes to stderr.
#
# No loop device, nbd or mount of the image is needed: the root file system is
# made from the debootstrapped directory with `mkfs.ext4 -d`, and GRUB's boot
# sector and core image are written into the MBR and the gap before the
# partition, which is what grub-install does for a BIOS/MBR disk. This works in
# containers where partition nodes (/dev/loop0p1) never appear.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${VMDRIVER_CLOUD_GUEST_CACHE:-/var/cache/vmdriver/cloud-guest}"
files="$here/files"

MIRROR=http://deb.debian.org/debian
SUITE=bookworm
# minbase + what a cloud image needs. udev: device nodes, by-label links and
# module autoloading; iproute2: cloud-init's networking; grub-pc-bin: the
# bootloader images (grub-pc itself would run grub-install in its postinst).
# python3-cffi-backend: debootstrap's resolver ignores virtual packages, and
# python3-cryptography (cloud-init → oauthlib) depends on the virtual one it provides.
PACKAGES="linux-image-cloud-amd64 initramfs-tools cloud-init cloud-guest-utils
  qemu-guest-agent openssh-server systemd-sysv udev dbus iproute2 e2fsprogs
  grub-pc-bin sudo netbase python3-cffi-backend"
KERNEL_CMDLINE="console=tty0 console=ttyS0,115200 ro"
DISK_LABEL=cloudimg-rootfs
PART_START=2048   # sectors: 1 MiB, room for GRUB's core image before the partition

log() { echo "cloud/build.sh: [${SECONDS}s] $*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root"
for t in debootstrap mkfs.ext4 sfdisk qemu-img apt-cache sha256sum python3; do
    command -v "$t" >/dev/null 2>&1 || die "missing $t (apt-get install debootstrap e2fsprogs fdisk qemu-utils)"
done

# --- content key: this script, files/, and the package versions the mirror has now
mkdir -p "$cache_root"
apt_opts=(-o "Dir::Cache::pkgcache=$cache_root/apt-pkgcache.bin")
resolve() {
    local kernel
    kernel="$(apt-cache "${apt_opts[@]}" depends linux-image-cloud-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')"
    [ -n "$kernel" ] || return 1
    # shellcheck disable=SC2086
    versions="$(apt-cache "${apt_opts[@]}" show --no-all-versions $PACKAGES "$kernel" 2>/dev/null |
        awk '/^Package:/ { p = $2 } /^Version:/ { print p "=" $2 }' | sort)"
    [ "$(echo "$versions" | wc -l)" -gt 10 ]
}
if ! resolve; then
    log "package lists missing or stale, running apt-get update"
    apt-get update -qq >&2
    resolve || die "cannot resolve $PACKAGES"
fi
key="$(
    {
        echo "build.sh"; sha256sum <"$here/build.sh"
        for f in $(cd "$files" && find . -type f | LC_ALL=C sort); do
            echo "file $f"; sha256sum <"$files/$f"
        done
        echo "$MIRROR $SUITE $PACKAGES"
        echo "$versions"
        dpkg-query -W -f '${Package}=${Version}\n' debootstrap e2fsprogs
    } | sha256sum | cut -c1-32
)"
outdir="$cache_root/$key"

finish() {
    ln -sfn "$outdir" "$here/out"
    echo "$outdir"
    exit 0
}
if [ -f "$outdir/manifest.json" ]; then
    log "cached build $outdir"
    finish
fi

# --- clean-up on every exit path: unmount what debootstrap or we mounted, drop the work dir
t0=$SECONDS
work="$(mktemp -d "$cache_root/.build.XXXXXX")"
root="$work/root"
cleanup() {
    local m
    # deepest mount points first
    for m in $(awk -v r="$root" '$2 == r || index($2, r "/") == 1 { print $2 }' /proc/self/mounts | sort -r); do
        umount -l "$m" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- debootstrap ---------------------------------------------------------------
debdir="$cache_root/debs"
mkdir -p "$debdir" "$root/etc/dpkg/dpkg.cfg.d"
# dpkg honours path-exclude from the very first package of the second stage
install -m 0644 "$files/01-nodoc" "$root/etc/dpkg/dpkg.cfg.d/01-nodoc"
log "debootstrap $SUITE from $MIRROR (packages cached in $debdir)"
if ! debootstrap --variant=minbase --cache-dir="$debdir" \
        --include="$(echo $PACKAGES | tr ' ' ',')" \
        "$SUITE" "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1; then
    tail -n 30 "$work/debootstrap.log" >&2
    [ -f "$root/debootstrap/debootstrap.log" ] && tail -n 30 "$root/debootstrap/debootstrap.log" >&2
    die "debootstrap failed"
fi
log "debootstrap done"

# --- configuration ------------------------------------------------------------
uuid="$(python3 -c 'import uuid; print(uuid.uuid4())')"
kver="$(cd "$root/lib/modules" && ls)"
[ "$(echo "$kver" | wc -l)" = 1 ] || die "expected one kernel, got: $kver"
[ -f "$root/boot/initrd.img-$kver" ] || die "no initramfs for $kver"

install -m 0644 "$files/90-vmdriver.cfg" "$root/etc/cloud/cloud.cfg.d/90-vmdriver.cfg"
install -m 0644 "$files/99-dhcp.network" "$root/etc/systemd/network/99-dhcp.network"
printf 'UUID=%s / ext4 errors=remount-ro 0 1\n' "$uuid" >"$root/etc/fstab"
printf 'LANG=C.UTF-8\n' >"$root/etc/default/locale"
echo localhost >"$root/etc/hostname"
printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
printf 'deb %s %s main\ndeb http://deb.debian.org/debian-security %s-security main\n' \
    "$MIRROR" "$SUITE" "$SUITE" >"$root/etc/apt/sources.list"
chroot "$root" systemctl enable -q systemd-networkd.service
# Each VM gets its own identity at first boot.
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id" "$root"/etc/ssh/ssh_host_*
chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log \
    "$root/var/log/apt"/* "$root/debootstrap" "$root/var/lib/cloud"/*
# debootstrap unpacked its first-stage packages before dpkg knew the excludes
find "$root/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete 2>/dev/null || true
rm -rf "$root"/usr/share/{man,info,lintian}/* 2>/dev/null || true
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} + 2>/dev/null || true

# --- GRUB: core image with what grub.cfg needs, config on the root fs ----------
mkdir -p "$root/boot/grub"
cat >"$root/boot/grub/grub.cfg" <<EOF
serial --unit=0 --speed=115200
terminal_input serial console
terminal_output serial console
set timeout=0
menuentry "Debian GNU/Linux (vmdriver cloud guest)" {
    search --no-floppy --fs-uuid --set=root $uuid
    linux /boot/vmlinuz-$kver root=UUID=$uuid $KERNEL_CMDLINE
    initrd /boot/initrd.img-$kver
}
EOF
# The prefix names the first partition of the boot disk; every module grub.cfg
# uses is built in, so no module directory has to be found on disk.
chroot "$root" grub-mkimage -O i386-pc -o /boot/grub/core.img -p '(hd0,msdos1)/boot/grub' \
    biosdisk part_msdos ext2 normal configfile linux serial terminal search search_fs_uuid echo test
core_bytes="$(stat -c %s "$root/boot/grub/core.img")"
[ "$core_bytes" -lt $(( (PART_START - 1) * 512 )) ] || die "core.img ($core_bytes bytes) does not fit before the partition"
cp "$root/usr/lib/grub/i386-pc/boot.img" "$work/boot.img"
mv "$root/boot/grub/core.img" "$work/core.img"

# --- the disk: MBR + one ext4 partition made from the directory ----------------
used_mb=$(( $(du -sxm "$root" | cut -f1) ))
part_mb=$(( used_mb + used_mb / 4 + 256 ))   # room for logs, keys, a few packages
log "root file system: ${used_mb} MiB used, ${part_mb} MiB partition"
mkfs.ext4 -q -F -L "$DISK_LABEL" -U "$uuid" -d "$root" "$work/part.img" "${part_mb}M"
disk="$work/disk.raw"
truncate -s $(( PART_START * 512 + part_mb * 1024 * 1024 )) "$disk"
echo "start=$PART_START, type=83, bootable" | sfdisk -q --label dos "$disk" >&2
dd if="$work/part.img" of="$disk" bs=1M seek=1 conv=notrunc,sparse status=none
# boot.img's first 440 bytes (the rest of sector 0 is the disk id and partition
# table); its default pointer to core.img is sector 1, where core.img goes.
dd if="$work/boot.img" of="$disk" bs=440 count=1 conv=notrunc status=none
dd if="$work/core.img" of="$disk" bs=512 seek=1 conv=notrunc status=none

out="$work/out"
mkdir -p "$out"
qemu-img convert -c -f raw -O qcow2 "$disk" "$out/disk.qcow2"

# --- manifest.json --------------------------------------------------------------
chroot "$root" dpkg-query -W -f '${Package}\t${Version}\n' >"$work/packages.tsv"
python3 - "$out" "$key" "$kver" "$uuid" "$KERNEL_CMDLINE" "$work/packages.tsv" "$MIRROR" "$SUITE" <<'PY'
import hashlib, json, os, sys
out, key, kver, uuid, cmdline, pkgs, mirror, suite = sys.argv[1:]
disk = os.path.join(out, "disk.qcow2")
h = hashlib.sha256()
with open(disk, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
packages = dict(line.rstrip("\n").split("\t") for line in open(pkgs))
manifest = {
    "key": key,
    "suite": suite,
    "mirror": mirror,
    "kernel_version": kver,
    "kernel_cmdline": cmdline,
    "root_uuid": uuid,
    "default_user": "debian",
    "datasource_list": ["NoCloud", "None"],
    "console": "ttyS0",
    "packages": packages,
    "outputs": {"disk.qcow2": {"sha256": h.hexdigest(), "size": os.path.getsize(disk)}},
}
with open(os.path.join(out, "manifest.json"), "w") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
    f.write("\n")
PY

if ! mv -T "$out" "$outdir" 2>/dev/null; then
    [ -f "$outdir/manifest.json" ] || die "cannot move the build to $outdir"
    log "another build finished $outdir first; using it"
fi
# keep the 2 newest builds, drop older ones
find "$cache_root" -mindepth 1 -maxdepth 1 -type d -regextype posix-extended \
    -regex '.*/[0-9a-f]{32}' -printf '%T@ %p\n' | sort -rn | tail -n +3 | cut -d' ' -f2- |
while read -r old; do
    [ -f "$old/manifest.json" ] && rm -rf "$old"
done
log "built $outdir in $((SECONDS - t0))s ($(du -m "$outdir/disk.qcow2" | cut -f1) MiB qcow2)"
finish
