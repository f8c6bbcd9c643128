#!/usr/bin/env bash
# build-guest.sh: build the QEMU test guest into qemu/build/.
#
# The guest is a Debian 6.1 kernel plus a tiny initramfs: busybox-static, the
# virtio-net modules, the test init (qemu/init) and the test programs built
# from qemu/guest/*.c with `gcc -static`.  Everything comes from Debian
# packages fetched with `apt-get download` and unpacked with `dpkg-deb`;
# nothing is installed on the host except this script's own build tools.
#
# Outputs (qemu/build/, gitignored):
#   vmlinux             uncompressed ELF kernel; QEMU boots it through its PVH
#                       note, which skips the bzImage decompressor (~1 s
#                       faster under TCG)
#   bzImage             the package's vmlinuz, kept as a fallback
#   initramfs.cpio.gz   the root filesystem
#   image.env           KERNEL=, INITRD=, KERNEL_VERSION=, ... (sourced by
#                       vhostnet/launch/qemu.py to find the image)
#
# Caching: downloads are kept in qemu/build/debs/.  The kernel is unpacked once
# per package version (kernel/.stamp).  The initramfs is rebuilt only when the
# hash of its inputs changes (this script, qemu/init, qemu/guest/*, the package
# versions, the compiler and libc versions): see .initramfs.stamp.  A warm run
# costs a couple of apt-cache queries and a sha256sum.
#
# Environment:
#   GUEST_BUILD_DIR   output directory (default: qemu/build)
#   KERNEL_PKG        Debian kernel package to use (default: the newest
#                     linux-image-6.1.0-N-amd64[-unsigned] apt knows)
#   FORCE=1           rebuild everything except the downloads
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SRC=$ROOT/qemu
OUT=${GUEST_BUILD_DIR:-$ROOT/qemu/build}
FORCE=${FORCE:-0}

# Load order of the virtio-net stack; modules built into the kernel are skipped.
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
         failover net_failover virtio_net)

KERNEL_RECIPE=2

T0=$(date +%s.%N)
say() { printf 'build-guest: %s\n' "$*" >&2; }
die() { printf 'build-guest: error: %s\n' "$*" >&2; exit 1; }
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# --- build tools -------------------------------------------------------------

ensure_tools() {
    command -v dpkg-deb >/dev/null && command -v apt-get >/dev/null ||
        die "needs a Debian-like host (apt-get, dpkg-deb) to fetch the guest packages"
    local missing=()
    command -v xz >/dev/null || missing+=(xz-utils)
    command -v cpio >/dev/null || missing+=(cpio)
    command -v gzip >/dev/null || missing+=(gzip)
    command -v gcc >/dev/null || missing+=(gcc)
    # gcc -static needs libc.a, which is in libc6-dev.
    [ -e "$(gcc -print-file-name=libc.a 2>/dev/null)" ] && [ "$(gcc -print-file-name=libc.a 2>/dev/null)" != libc.a ] ||
        missing+=(libc6-dev)
    [ ${#missing[@]} -eq 0 ] && return
    if [ "$(id -u)" -ne 0 ]; then
        die "missing build tools: ${missing[*]} (run: sudo apt-get install -y ${missing[*]}, or make setup)"
    fi
    say "installing build tools: ${missing[*]}"
    apt_lists_ready || apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

apt_lists_ready() { apt-cache show busybox-static >/dev/null 2>&1; }

# --- package resolution ------------------------------------------------------

resolve_packages() {
    local try
    for try in 1 2; do
        query_packages && return
        [ "$try" = 1 ] && [ "$(id -u)" -eq 0 ] || break
        say "apt does not know the guest packages yet: apt-get update"
        apt-get update -qq
    done
    die "apt knows no ${KERNEL_PKG:-linux-image-6.1.0-N-amd64} or busybox-static package" \
        "(run 'apt-get update' as root)"
}

# Set KERNEL_PKG (unless given), KERNEL_VER and BUSYBOX_VER from apt's lists.
# Two apt-cache calls (each costs ~0.4 s): this is most of a warm build.
query_packages() {
    local kpkg=${KERNEL_PKG:-} versions
    if [ -z "$kpkg" ]; then
        # Newest ABI (the N in linux-image-6.1.0-N-amd64) first; at equal ABI
        # prefer -unsigned (the same kernel without the EFI signature).
        kpkg=$(apt-cache pkgnames linux-image-6.1.0- | awk '
            /^linux-image-6\.1\.0-[0-9]+-amd64(-unsigned)?$/ {
                split($0, f, "-"); score = f[4] * 2 + ($0 ~ /-unsigned$/)
                if (score > best) { best = score; pkg = $0 }
            }
            END { print pkg }')
        [ -n "$kpkg" ] || return 1
    fi
    versions=$(apt-cache policy "$kpkg" busybox-static 2>/dev/null |
        awk '/^[^ ]/ { pkg = $1; sub(/:$/, "", pkg) } /Candidate:/ { print pkg, $2 }')
    KERNEL_VER=$(awk -v p="$kpkg" '$1 == p && $2 != "(none)" { print $2 }' <<<"$versions")
    BUSYBOX_VER=$(awk '$1 == "busybox-static" && $2 != "(none)" { print $2 }' <<<"$versions")
    [ -n "$KERNEL_VER" ] && [ -n "$BUSYBOX_VER" ] || return 1
    KERNEL_PKG=$kpkg
}

# Download PKG=VERSION into debs/ unless it is already there; print the path.
fetch_deb() {
    local pkg=$1 ver=$2 f
    f=$(find "$OUT/debs" -maxdepth 1 -name "${pkg}_${ver//:/%3a}_*.deb" | head -n1)
    if [ -z "$f" ]; then
        say "downloading $pkg $ver"
        (cd "$OUT/debs" && apt-get download -q "$pkg=$ver" 2>&1 |
            grep -v -e 'unsandboxed as root' -e '^W: .*pkgAcquire' >&2 || true)
        f=$(find "$OUT/debs" -maxdepth 1 -name "${pkg}_${ver//:/%3a}_*.deb" | head -n1)
        [ -n "$f" ] || die "apt-get download $pkg=$ver failed"
        # Keep only the current version of each package.
        find "$OUT/debs" -maxdepth 1 -name "${pkg}_*.deb" ! -path "$f" -delete
    fi
    printf '%s' "$f"
}

# --- kernel ------------------------------------------------------------------

build_kernel() {
    # Bump KERNEL_RECIPE when this function changes what it produces.
    local key="recipe $KERNEL_RECIPE $KERNEL_PKG=$KERNEL_VER" dir=$OUT/kernel deb
    if [ "$FORCE" != 1 ] && [ -f "$dir/.stamp" ] && [ "$(cat "$dir/.stamp")" = "$key" ]; then
        say "kernel $KERNEL_PKG $KERNEL_VER: cached"
        return
    fi
    deb=$(fetch_deb "$KERNEL_PKG" "$KERNEL_VER")
    say "unpacking $(basename "$deb")"
    rm -rf "$dir" "$dir.tmp"
    mkdir -p "$dir.tmp/pkg"
    # Only the kernel, its config and the few modules we need.
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$dir.tmp/pkg" --wildcards \
        '*/boot/vmlinuz-*' '*/boot/config-*' '*/modules.builtin' \
        '*/kernel/drivers/virtio/*' '*/kernel/drivers/net/*.ko*' '*/kernel/net/core/*'
    local vmlinuz kver
    vmlinuz=$(find "$dir.tmp/pkg" -path '*/boot/vmlinuz-*' | head -n1)
    [ -n "$vmlinuz" ] || die "no vmlinuz in $deb"
    kver=${vmlinuz##*/vmlinuz-}
    cp "$vmlinuz" "$dir.tmp/bzImage"
    cp "$(find "$dir.tmp/pkg" -path '*/boot/config-*' | head -n1)" "$dir.tmp/config"

    # The bzImage wraps an xz stream holding the ELF vmlinux.  Booting that ELF
    # directly (QEMU uses its PVH entry note) skips the in-guest decompression.
    say "extracting vmlinux from the bzImage (xz stream)"
    local off
    off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$dir.tmp/bzImage" | head -n1 | cut -d: -f1 || true)
    if [ -n "$off" ]; then
        # xz stops at the end of the stream; tail then dies of SIGPIPE.
        { tail -c +"$((off + 1))" "$dir.tmp/bzImage" || true; } |
            xz -dc --single-stream >"$dir.tmp/vmlinux" 2>/dev/null || rm -f "$dir.tmp/vmlinux"
    fi
    if [ ! -s "$dir.tmp/vmlinux" ] ||
            [ "$(head -c4 "$dir.tmp/vmlinux" | od -An -tx1 | tr -d ' \n')" != 7f454c46 ]; then
        say "warning: no xz-compressed ELF inside the bzImage; the guest will boot the bzImage"
        rm -f "$dir.tmp/vmlinux"
    fi

    # Modules: take the .ko of each one in load order; skip built-ins.
    local builtin m ko n=0
    builtin=$(find "$dir.tmp/pkg" -name modules.builtin | head -n1)
    mkdir -p "$dir.tmp/modules"
    : >"$dir.tmp/modules/order"
    for m in "${MODULES[@]}"; do
        ko=$(find "$dir.tmp/pkg" \( -name "$m.ko" -o -name "$m.ko.xz" \) | head -n1)
        if [ -n "$ko" ]; then
            n=$((n + 1))
            case $ko in
                *.xz) xz -dc "$ko" >"$dir.tmp/modules/$m.ko" ;;
                *) cp "$ko" "$dir.tmp/modules/$m.ko" ;;
            esac
            echo "$m" >>"$dir.tmp/modules/order"
        elif grep -qE "/$m\.ko$" "$builtin"; then
            say "  $m is built into the kernel"
        else
            die "module $m is neither built in nor shipped in $KERNEL_PKG"
        fi
    done
    say "  $n modules: $(tr '\n' ' ' <"$dir.tmp/modules/order")"
    echo "$kver" >"$dir.tmp/release"
    rm -rf "$dir.tmp/pkg"
    echo "$key" >"$dir.tmp/.stamp"
    mv "$dir.tmp" "$dir"
}

# --- initramfs ---------------------------------------------------------------

inputs_hash() {
    {
        echo "kernel $KERNEL_PKG=$KERNEL_VER busybox $BUSYBOX_VER"
        echo "gcc $(gcc -dumpfullversion) libc $(dpkg-query -W -f='${Version}' libc6-dev 2>/dev/null || echo '?')"
        (cd "$ROOT" && sha256sum scripts/build-guest.sh qemu/init qemu/guest/*)
    } | sha256sum | cut -c1-16
}

build_initramfs() {
    local hash stamp=$OUT/.initramfs.stamp
    hash=$(inputs_hash)
    if [ "$FORCE" != 1 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$hash" ] &&
            [ -f "$OUT/initramfs.cpio.gz" ]; then
        say "initramfs $hash: cached"
        return
    fi
    local deb root=$OUT/rootfs
    deb=$(fetch_deb busybox-static "$BUSYBOX_VER")
    rm -rf "$root" "$OUT/busybox"
    mkdir -p "$OUT/busybox" "$root"/{bin,sbin,dev,proc,sys,tmp,run,etc,lib/modules}
    dpkg-deb -x "$deb" "$OUT/busybox"
    cp "$OUT/busybox/bin/busybox" "$root/bin/busybox"
    # One symlink per applet (the static busybox runs on the host too).
    local applet
    for applet in $("$root/bin/busybox" --list); do
        [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
    done
    cp "$OUT"/kernel/modules/*.ko "$OUT/kernel/modules/order" "$root/lib/modules/"
    install -m 0755 "$SRC/init" "$root/init"

    local c prog
    mkdir -p "$OUT/guest"
    for c in "$SRC"/guest/*.c; do
        prog=$(basename "$c" .c)
        say "compiling guest/$prog.c"
        gcc -static -O2 -Wall -Wextra -Werror -o "$OUT/guest/$prog" "$c"
        strip "$OUT/guest/$prog" 2>/dev/null || true
        cp "$OUT/guest/$prog" "$root/bin/$prog"
    done

    say "packing initramfs.cpio.gz"
    (cd "$root" && find . | LC_ALL=C sort |
        cpio -o -H newc --owner=0:0 --quiet) | gzip -6n >"$OUT/initramfs.cpio.gz.tmp"
    mv "$OUT/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"
    echo "$hash" >"$stamp"
}

write_manifest() {
    kernel=$OUT/vmlinux
    if [ -f "$OUT/kernel/vmlinux" ]; then
        ln -sfn kernel/vmlinux "$OUT/vmlinux"
    else
        rm -f "$OUT/vmlinux"
        kernel=$OUT/bzImage
    fi
    ln -sfn kernel/bzImage "$OUT/bzImage"
    cat >"$OUT/image.env.tmp" <<EOF
KERNEL=$kernel
INITRD=$OUT/initramfs.cpio.gz
KERNEL_VERSION=$(cat "$OUT/kernel/release")
KERNEL_PKG=$KERNEL_PKG=$KERNEL_VER
BUSYBOX_PKG=busybox-static=$BUSYBOX_VER
INPUTS=$(cat "$OUT/.initramfs.stamp")
EOF
    mv "$OUT/image.env.tmp" "$OUT/image.env"
}

main() {
    mkdir -p "$OUT/debs"
    # One build at a time per output directory (parallel smoke runs share it).
    if command -v flock >/dev/null; then
        exec 9>"$OUT/.lock"
        flock -n 9 || { say "waiting for another build of $OUT"; flock 9; }
    fi
    ensure_tools
    resolve_packages
    build_kernel
    build_initramfs
    write_manifest
    say "done in $(elapsed) s: $kernel ($(cat "$OUT/kernel/release")), $OUT/initramfs.cpio.gz ($(du -k "$OUT/initramfs.cpio.gz" | cut -f1) KiB)"
}

main "$@"
