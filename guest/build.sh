#!/bin/bash
# Builds the vmdriver test guest from Debian packages:
#   vmlinuz, initrd.img, disk.raw, disk.qcow2, guest.iso, manifest.json
# into ${VMDRIVER_GUEST_CACHE:-/var/cache/vmdriver/guest}/<content key>,
# points guest/out at it and prints that directory as the last stdout line.
# Run as root on Debian 12. Progress goes to stderr.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${VMDRIVER_GUEST_CACHE:-/var/cache/vmdriver/guest}"
files="$here/files"

READY_PREFIX=VMDRIVER-GUEST-READY
HTTP_PORT=8080
KERNEL_CMDLINE="console=ttyS0,115200 quiet loglevel=3 cryptomgr.notests"
# Modules the guest wants; their dependencies are added from modules.dep.
WANT_MODULES="virtio_pci virtio_net e1000 e1000e virtio_console evdev button
  pvpanic pvpanic_mmio pvpanic_pci pvpanic_isa qemu_fw_cfg
  virtio_blk virtio_scsi sd_mod sr_mod ahci ata_piix xhci_pci usb_storage uas
  9p 9pnet_virtio virtiofs tpm_tis tpm_crb virtio_balloon virtio_rng"
# /usr/bin/perl (and the library it needs beyond libc) runs the UDP echo service.
PERL_PKGS="perl-base libcrypt1"
# Host tools whose versions shape the images (bootloaders, filesystems).
HOST_PKGS="syslinux syslinux-common isolinux mtools dosfstools fdisk xorriso zstd cpio qemu-utils kmod"

log() { echo "build.sh: [${SECONDS}s] $*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root"

# --- host tools ---------------------------------------------------------
missing=
for t in apt-get apt-cache dpkg-deb dpkg-query depmod cpio zstd xorriso syslinux \
         mcopy mkfs.fat sfdisk qemu-img sha256sum python3; do
    command -v "$t" >/dev/null 2>&1 || missing="$missing $t"
done
for f in /usr/lib/ISOLINUX/isolinux.bin /usr/lib/ISOLINUX/isohdpfx.bin \
         /usr/lib/syslinux/modules/bios/ldlinux.c32 /usr/lib/syslinux/mbr/mbr.bin; do
    [ -e "$f" ] || missing="$missing $f"
done
if [ -n "$missing" ]; then
    log "missing:$missing; installing $here/apt-packages.txt"
    apt-get update -qq >&2
    # shellcheck disable=SC2046
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        $(grep -v '^#' "$here/apt-packages.txt") >&2
fi

# --- resolve the Debian packages --------------------------------------
# Debian's docker images switch apt's binary cache off, which costs ~1.5 s per
# apt call; keep a private one next to the builds.
mkdir -p "$cache_root"
apt_opts=(-o "Dir::Cache::pkgcache=$cache_root/apt-pkgcache.bin")
resolve() {
    kernel_pkg="$(apt-cache "${apt_opts[@]}" depends linux-image-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }')"
    [ -n "$kernel_pkg" ] || return 1
    qga_pkgs="$(apt-cache "${apt_opts[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts \
        --no-breaks --no-replaces --no-enhances --no-pre-depends qemu-guest-agent 2>/dev/null |
        grep -v -e '^ ' -e '^<' | sort -u | tr '\n' ' ')"
    case " $qga_pkgs " in *" libc6 "*) ;; *) return 1 ;; esac
    # Lines: 'URL' FILENAME SIZE SHA256:HASH
    # shellcheck disable=SC2086
    uris="$(apt-get "${apt_opts[@]}" download --print-uris busybox-static "$kernel_pkg" $qga_pkgs \
        $PERL_PKGS 2>/dev/null |
        sort)" || return 1
    [ -n "$uris" ]
}
if ! resolve; then
    log "package lists missing or stale, running apt-get update"
    apt-get update -qq >&2
    resolve || die "cannot resolve linux-image-amd64 / qemu-guest-agent / busybox-static"
fi

# shellcheck disable=SC2086
host_versions="$(dpkg-query -W -f '${Package}=${Version}\n' $HOST_PKGS | sort)"

# --- content key ------------------------------------------------------
compute_key() {
    key="$(
        {
            echo "build.sh"; sha256sum <"$here/build.sh"
            for f in $(cd "$files" && find . -type f | LC_ALL=C sort); do
                echo "file $f"; sha256sum <"$files/$f"
            done
            echo "$uris" | awk '{ print $2, $4 }'
            echo "$host_versions"
        } | sha256sum | cut -c1-32
    )"
    outdir="$cache_root/$key"
}

finish() {
    ln -sfn "$outdir" "$here/out"
    echo "$outdir"
    exit 0
}
finish_if_cached() {
    if [ -f "$outdir/manifest.json" ]; then
        log "cached build $outdir"
        finish
    fi
}

compute_key
finish_if_cached

t0=$SECONDS
work="$(mktemp -d "$cache_root/.build.XXXXXX")"
trap 'rm -rf "$work"' EXIT

# --- download (.debs are kept in $cache_root/debs) --------------------
debdir="$cache_root/debs"
mkdir -p "$debdir"
download_all() {
    local file hash pkg ver
    debs=()
    while read -r _ file _ hash; do
        hash="${hash#SHA256:}"
        if ! [ -f "$debdir/$file" ] || ! echo "$hash  $debdir/$file" | sha256sum -c --status; then
            pkg="${file%%_*}"
            ver="$(echo "$file" | cut -d_ -f2 | sed 's/%3a/:/g; s/%2b/+/g; s/%7e/~/g')"
            log "downloading $pkg=$ver"
            if ! (cd "$work" && apt-get "${apt_opts[@]}" download -q "$pkg=$ver" \
                    </dev/null >/dev/null 2>"$work/apt.log"); then
                cat "$work/apt.log" >&2
                return 1
            fi
            mv "$work/$file" "$debdir/$file"
            echo "$hash  $debdir/$file" | sha256sum -c --status || die "checksum mismatch for $file"
        fi
        debs+=("$file")
    done <<<"$uris"
}
if ! download_all; then
    log "download failed, package lists may be stale: apt-get update and retry"
    apt-get update -qq >&2
    resolve || die "cannot resolve the packages"
    compute_key
    finish_if_cached
    download_all || die "cannot download the packages"
fi
# forget .debs that are no longer current (old kernels are 70 MB each)
for f in "$debdir"/*.deb; do
    case " ${debs[*]} " in *" ${f##*/} "*) ;; *) rm -f "$f" ;; esac
done

unpack() { # unpack DIR PKG...
    local dir="$1" f; shift
    mkdir -p "$dir"
    for p in "$@"; do
        for f in "${debs[@]}"; do
            if [ "${f%%_*}" = "$p" ]; then dpkg-deb -x "$debdir/$f" "$dir"; fi
        done
    done
}

root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc/acpi/PWRF,etc/vmdriver,lib/modules,lib64,dev,proc,sys,run,tmp,var,www}

# --- kernel + modules -------------------------------------------------
log "unpacking $kernel_pkg"
unpack "$work/kernel" "$kernel_pkg"
kver="$(ls "$work/kernel/lib/modules")"
[ "$(echo "$kver" | wc -l)" = 1 ] || die "expected one kernel version, got: $kver"
kmods="$work/kernel/lib/modules/$kver"
cp "$work/kernel/boot/vmlinuz-$kver" "$work/vmlinuz"
depmod -b "$work/kernel" "$kver"   # the .deb ships no modules.dep

# The bzImage payload is XZ, which takes ~5 s to unpack under TCG. Also ship the
# unpacked ELF vmlinux: QEMU boots it directly via its PVH entry (-kernel only).
python3 - "$work/vmlinuz" "$work/vmlinux" <<'PY'
import lzma, sys
data = open(sys.argv[1], "rb").read()
start = data.find(b"\xfd7zXZ\x00")
assert start > 0, "no XZ payload in vmlinuz"
elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[start:])
assert elf[:4] == b"\x7fELF", "XZ payload is not an ELF image"
open(sys.argv[2], "wb").write(elf)
PY

# name -> path relative to $kmods (modules.dep uses '-' or '_' as built)
modpath() {
    awk -F: -v want="$1" '{ n = $1; sub(/.*\//, "", n); sub(/\.ko(\.[a-z]+)?$/, "", n);
        gsub(/-/, "_", n); if (n == want) { print $1; exit } }' "$2"
}
builtin_mods=
absent_mods=
loadlist="$work/modules.list"
: >"$loadlist"
for m in $WANT_MODULES; do
    p="$(modpath "$m" "$kmods/modules.dep")"
    if [ -z "$p" ]; then
        if [ -n "$(modpath "$m" "$kmods/modules.builtin")" ]; then
            builtin_mods="$builtin_mods $m"
        else
            absent_mods="$absent_mods $m"
        fi
        continue
    fi
    # modprobe order: dependencies from the end of the list first, module last
    grep -m1 "^$p:" "$kmods/modules.dep" |
        awk -F': *' '{ n = split($2, d, " "); for (i = n; i >= 1; i--) print d[i]; print $1 }' \
        >>"$loadlist"
done
awk '!seen[$0]++' "$loadlist" >"$work/modules.uniq"
: >"$root/etc/vmdriver/modules.order"
loaded_mods=
while read -r p; do
    n="$(basename "$p")"; n="${n%.ko}"
    case "$p" in *.ko) ;; *) die "compressed module $p not supported" ;; esac
    cp "$kmods/$p" "$root/lib/modules/$n.ko"
    echo "$n" >>"$root/etc/vmdriver/modules.order"
    loaded_mods="$loaded_mods $n"
done <"$work/modules.uniq"
log "modules:$loaded_mods; built in:${builtin_mods:- none}; not in this kernel:${absent_mods:- none}"

# --- busybox ----------------------------------------------------------
unpack "$work/bb" busybox-static
cp "$work/bb/bin/busybox" "$root/bin/busybox"
for a in $("$root/bin/busybox" --list-full); do
    case "$a" in */*) ;; *) continue ;; esac
    [ -e "$root/$a" ] || [ -L "$root/$a" ] && continue
    mkdir -p "$root/$(dirname "$a")"
    ln -s /bin/busybox "$root/$a"
done

# --- qemu-ga and the shared libraries it needs ------------------------
# shellcheck disable=SC2086
unpack "$work/ga" $qga_pkgs
ga="$work/ga"
cp "$ga/usr/sbin/qemu-ga" "$root/usr/sbin/qemu-ga"
ldso="$ga/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
[ -f "$ldso" ] || die "no dynamic loader in libc6"
libpath="$ga/lib/x86_64-linux-gnu:$ga/usr/lib/x86_64-linux-gnu"
mkdir -p "$root/lib/x86_64-linux-gnu"
cp "$ldso" "$root/lib/x86_64-linux-gnu/"
ln -sfn /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$root/lib64/ld-linux-x86-64.so.2"
libs="$("$ldso" --library-path "$libpath" --list "$ga/usr/sbin/qemu-ga")" ||
    die "cannot list qemu-ga libraries: $libs"
# glibc dlopens libgcc_s for thread cancellation
libs="$libs
	libgcc_s.so.1 => $ga/lib/x86_64-linux-gnu/libgcc_s.so.1 (0)"
qga_libs=
while read -r name arrow path _; do
    [ "$arrow" = "=>" ] || continue
    case "$name" in /*) continue ;; esac   # the loader, copied above
    case "$path" in
        "$ga"/*) ;;
        *) die "qemu-ga needs $name, not found in the unpacked packages ($path)" ;;
    esac
    rel="${path#"$ga"}"
    mkdir -p "$root$(dirname "$rel")"
    rm -f "$root$rel"
    cp -L "$path" "$root$rel"
    qga_libs="$qga_libs $name"
done <<<"$libs"
log "qemu-ga libraries:$qga_libs"

# --- perl for the UDP echo (files/udp-echo uses core perl only, no modules) ---
# shellcheck disable=SC2086
unpack "$work/perl" $PERL_PKGS
cp "$work/perl/usr/bin/perl" "$root/usr/bin/perl"
plibs="$("$ldso" --library-path "$work/perl/lib/x86_64-linux-gnu:$libpath" --list "$root/usr/bin/perl")" ||
    die "cannot list perl libraries: $plibs"
while read -r name arrow path _; do
    [ "$arrow" = "=>" ] || continue
    rel="${path#"$work/perl"}"; rel="${rel#"$ga"}"
    [ -e "$root$rel" ] || { mkdir -p "$root$(dirname "$rel")"; cp -L "$path" "$root$rel"; }
done <<<"$plibs"

# --- guest files ------------------------------------------------------
install -m 0755 "$files/init" "$root/init"
install -m 0755 "$files/udhcpc.script" "$root/etc/udhcpc.script"
install -m 0755 "$files/power-button" "$root/etc/acpi/PWRF/00000080"
install -m 0755 "$files/shutdown" "$root/sbin/shutdown"
install -m 0755 "$files/udp-echo" "$root/usr/bin/udp-echo"
printf 'root:x:0:0:root:/:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"
echo vmdriver-guest >"$root/etc/hostname"
printf 'NAME="vmdriver test guest"\nID=vmdriver-guest\nVERSION_ID=%s\nPRETTY_NAME="vmdriver test guest (Debian kernel %s)"\n' \
    "$key" "$kver" >"$root/etc/os-release"
mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || log "mknod /dev/console failed (init reopens it)"
mknod -m 666 "$root/dev/null" c 1 3 2>/dev/null || true

log "initrd"
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort |
    cpio --quiet -o -H newc -R 0:0 --reproducible) | zstd -q -19 -T0 >"$work/initrd.img"

# --- disk.raw: MBR (syslinux mbr.bin) + one FAT16 partition with syslinux -----
log "disk images"
out="$work/out"
mkdir -p "$out"
mv "$work/vmlinuz" "$work/vmlinux" "$work/initrd.img" "$out/"
cat >"$work/syslinux.cfg" <<EOF
SERIAL 0 115200
DEFAULT vmdriver
PROMPT 0
TIMEOUT 0
LABEL vmdriver
  KERNEL /vmlinuz
  INITRD /initrd.img
  APPEND $KERNEL_CMDLINE
EOF
payload_kb=$(( ($(stat -c %s "$out/vmlinuz") + $(stat -c %s "$out/initrd.img")) / 1024 ))
part_mb=$(( (payload_kb + 1024) / 1024 + 2 ))   # FAT, ldlinux and some slack
part_start=2048                                 # sectors (1 MiB)
truncate -s $(( part_mb + 1 ))M "$out/disk.raw"
echo "start=$part_start, type=e, bootable" | sfdisk -q --label dos "$out/disk.raw" >&2
mkfs.fat -F 16 -n VMDRIVER --offset "$part_start" "$out/disk.raw" $(( part_mb * 1024 )) >/dev/null
syslinux --install --offset $(( part_start * 512 )) "$out/disk.raw"
export MTOOLS_SKIP_CHECK=1
mcopy -i "$out/disk.raw@@$(( part_start * 512 ))" \
    "$out/vmlinuz" "$out/initrd.img" "$work/syslinux.cfg" ::/
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$out/disk.raw" bs=440 count=1 conv=notrunc status=none

qemu-img convert -f raw -O qcow2 "$out/disk.raw" "$out/disk.qcow2"

# --- guest.iso: isolinux, hybrid MBR ----------------------------------
iso="$work/iso"
mkdir -p "$iso/isolinux"
cp /usr/lib/ISOLINUX/isolinux.bin /usr/lib/syslinux/modules/bios/ldlinux.c32 "$iso/isolinux/"
cp "$work/syslinux.cfg" "$iso/isolinux/isolinux.cfg"
cp "$out/vmlinuz" "$out/initrd.img" "$iso/"
xorriso -as mkisofs -quiet -o "$out/guest.iso" -V VMDRIVER_GUEST -R -J \
    -b isolinux/isolinux.bin -c isolinux/boot.cat -no-emul-boot -boot-load-size 4 \
    -boot-info-table -isohybrid-mbr /usr/lib/ISOLINUX/isohdpfx.bin "$iso" 2>&1 |
    grep -v -e '^xorriso' -e '^Drive current' -e '^Media' -e '^Added' -e '^Writing' \
        -e '^ISO image' -e '^Written' -e 'libisofs' -e '^\s*$' >&2 || true
[ -s "$out/guest.iso" ] || die "xorriso failed"

echo "$KERNEL_CMDLINE" >"$out/cmdline"

# --- manifest.json ----------------------------------------------------
jlist() { local s='' x; for x in "$@"; do s="$s${s:+, }\"$x\""; done; echo "[$s]"; }
{
    echo "{"
    echo "  \"key\": \"$key\","
    echo "  \"readiness_prefix\": \"$READY_PREFIX\","
    echo "  \"http_port\": $HTTP_PORT,"
    echo "  \"http_marker\": \"vmdriver-test-guest\","
    echo "  \"udp_echo_port\": $HTTP_PORT,"
    echo "  \"guest_agent_port\": \"org.qemu.guest_agent.0\","
    echo "  \"modes\": [\"normal\", \"ignore-acpi\", \"panic\", \"poweroff\"],"
    echo "  \"mode_fw_cfg\": \"opt/vmdriver/mode\","
    echo "  \"mode_cmdline\": \"vmdriver.mode\","
    echo "  \"kernel_version\": \"$kver\","
    echo "  \"kernel_cmdline\": \"$KERNEL_CMDLINE\","
    echo "  \"direct_boot\": \"-kernel vmlinux (PVH ELF, no decompression: fastest) or -kernel vmlinuz, with -initrd initrd.img -append kernel_cmdline\","
    # shellcheck disable=SC2086
    echo "  \"modules\": $(jlist $loaded_mods),"
    # shellcheck disable=SC2086
    echo "  \"modules_builtin\": $(jlist $builtin_mods),"
    echo "  \"packages\": ["
    n=0
    for f in "${debs[@]}"; do
        n=$((n + 1))
        p="$(dpkg-deb -f "$debdir/$f" Package)"; v="$(dpkg-deb -f "$debdir/$f" Version)"
        printf '    {"name": "%s", "version": "%s"}%s\n' "$p" "$v" "$([ $n -lt ${#debs[@]} ] && echo ,)"
    done
    echo "  ],"
    # shellcheck disable=SC2086
    echo "  \"host_packages\": $(jlist $host_versions),"
    echo "  \"outputs\": {"
    set -- vmlinuz vmlinux initrd.img disk.raw disk.qcow2 guest.iso
    for f in "$@"; do
        shift
        printf '    "%s": {"sha256": "%s", "size": %s}%s\n' "$f" \
            "$(sha256sum "$out/$f" | cut -d' ' -f1)" "$(stat -c %s "$out/$f")" "$([ $# -gt 0 ] && echo ,)"
    done
    echo "  }"
    echo "}"
} >"$out/manifest.json"

if ! mv -T "$out" "$outdir" 2>/dev/null; then
    [ -f "$outdir/manifest.json" ] || die "cannot move the build to $outdir"
    log "another build finished $outdir first; using it"
fi
# keep the 3 newest builds (each ~110 MB), drop older ones
find "$cache_root" -mindepth 1 -maxdepth 1 -type d -regextype posix-extended \
    -regex '.*/[0-9a-f]{32}' -printf '%T@ %p\n' | sort -rn | tail -n +4 | cut -d' ' -f2- |
while read -r old; do
    [ -f "$old/manifest.json" ] && rm -rf "$old"
done
log "built $outdir in $((SECONDS - t0))s"
ls -l "$outdir" >&2
finish
