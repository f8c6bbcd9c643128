#!/usr/bin/env bash
# build-guest.sh: build the QEMU test guest into qemu/build/.
#
# The guest is a Debian 6.1 kernel plus a tiny initramfs: busybox-static, the
# virtio-net modules, the test init (qemu/init) and the test programs built
# from qemu/guest/*.c with `gcc -static`.  Everything comes from Debian
# packages fetched with `apt-get download` and unpacked with `dpkg-deb`;
# nothing is installed on the host except this script's own build tools.
#
# Two architectures (GUEST_ARCH):
#   amd64   the x86_64 guest (q35, virtio-pci), in qemu/build/
#   arm64   the aarch64 guest (`virt`, virtio-mmio or virtio-pci), in
#           qemu/build-arm64/; the packages are Debian's arm64 ones
#           (`dpkg --add-architecture arm64` once, done here when root) and
#           the test programs are built with aarch64-linux-gnu-gcc -static
#           (package gcc-aarch64-linux-gnu + libc6-dev-arm64-cross)
#
# The amd64 image also carries real applications for the guest to run against
# host servers: iperf3, redis-cli (redis-tools) and git (git:// only; no curl),
# and ethtool (multiqueue: `ethtool -L eth0 combined K`).
# Each binary is copied from its Debian package together with the shared
# libraries it needs (found by following ELF NEEDED entries through the
# unpacked packages of APP_PACKAGES) and its loader (PT_INTERP).  They go in a
# second cpio archive, apps.cpio, so that ordinary boots do not carry ~20 MB:
# initramfs-apps.cpio is the apps archive followed by the base one (Linux
# unpacks concatenated archives in order).  apps.cpio stays uncompressed:
# under TCG, inflating it in the guest cost ~1 s per boot, copying it ~0.  It
# must come first: Linux 6.1 ignored an uncompressed archive that followed
# the gzip one.
#
# Outputs (qemu/build/ or qemu/build-arm64/, gitignored):
#   vmlinux             amd64: uncompressed ELF kernel; QEMU boots it through
#                       its PVH note, which skips the bzImage decompressor
#                       (~1 s faster under TCG)
#   bzImage             amd64: the package's vmlinuz, kept as a fallback
#   Image               arm64: the uncompressed arm64 kernel image
#   initramfs.cpio.gz   the root filesystem
#   initramfs-apps.cpio   the same plus the applications (amd64)
#   image.env           KERNEL=, INITRD=, INITRD_APPS=, ARCH=, ... (read by
#                       vhostnet/launch/qemu.py to find the image)
#
# Caching: downloads are kept in debs/.  The kernel is unpacked once per
# package version (kernel/.stamp), the applications once per set of package
# versions (apps/.stamp).  The initramfs is rebuilt only when the hash of its
# inputs changes (this script, qemu/init, qemu/guest/*, the package versions,
# the compiler and libc versions): see .initramfs.stamp.  The package versions
# apt resolves are kept in .packages until apt's lists change.  A warm run
# costs a few sha256sums.
#
# Environment:
#   GUEST_ARCH        amd64 (default) or arm64
#   GUEST_BUILD_DIR   output directory (default: qemu/build, qemu/build-arm64)
#   KERNEL_PKG        Debian kernel package to use (default: the newest
#                     linux-image-6.1.0-N-ARCH[-unsigned] apt knows)
#   FORCE=1           rebuild everything except the downloads
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SRC=$ROOT/qemu
ARCH=${GUEST_ARCH:-amd64}
FORCE=${FORCE:-0}

# Load order of the virtio-net stack; modules built into the kernel are
# skipped.  virtio_mmio serves the `virt` machines' virtio-mmio transport.
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci
         virtio_mmio failover net_failover virtio_net)

case $ARCH in
amd64)
    OUT=${GUEST_BUILD_DIR:-$ROOT/qemu/build}
    TRIPLET=x86_64-linux-gnu
    CC=gcc
    # The applications and every package their shared libraries come from.
    # A library missing from these stops the build with its name.
    APP_BINARIES=(usr/bin/iperf3 usr/bin/redis-cli usr/lib/git-core/git sbin/ethtool)
    APP_PACKAGES=(libc6 libgcc-s1 libstdc++6 libssl3 zlib1g
                  iperf3 libiperf0 libsctp1
                  redis-tools libatomic1 libjemalloc2 liblzf1 libsystemd0 libcap2
                  libgcrypt20 libgpg-error0 liblz4-1 liblzma5 libzstd1
                  git libpcre2-8-0
                  ethtool libmnl0)
    ;;
arm64)
    OUT=${GUEST_BUILD_DIR:-$ROOT/qemu/build-arm64}
    TRIPLET=aarch64-linux-gnu
    CC=aarch64-linux-gnu-gcc
    APP_BINARIES=()
    APP_PACKAGES=()
    ;;
*) printf 'build-guest: error: GUEST_ARCH must be amd64 or arm64, not %s\n' "$ARCH" >&2; exit 2 ;;
esac

KERNEL_RECIPE=3
APPS_RECIPE=3

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
    command -v readelf >/dev/null || missing+=(binutils)
    if [ "$ARCH" = amd64 ]; then
        command -v gcc >/dev/null || missing+=(gcc)
        # gcc -static needs libc.a, which is in libc6-dev.
        have_libc_a gcc || missing+=(libc6-dev)
    else
        command -v "$CC" >/dev/null || missing+=(gcc-aarch64-linux-gnu)
        have_libc_a "$CC" || missing+=(libc6-dev-arm64-cross)
        ensure_foreign_arch
    fi
    [ ${#missing[@]} -eq 0 ] && return
    if [ "$(id -u)" -ne 0 ]; then
        die "missing build tools: ${missing[*]} (run: sudo apt-get install -y ${missing[*]}, or make setup)"
    fi
    say "installing build tools: ${missing[*]}"
    apt_lists_ready || apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

have_libc_a() {
    local f
    f=$("$1" -print-file-name=libc.a 2>/dev/null) || return 1
    [ "$f" != libc.a ] && [ -e "$f" ]
}

# arm64 packages need dpkg to know the architecture and apt to have its lists.
ensure_foreign_arch() {
    dpkg --print-foreign-architectures | grep -qx "$ARCH" && return
    [ "$(id -u)" -eq 0 ] || die "dpkg does not know $ARCH packages (run: sudo dpkg --add-architecture $ARCH && sudo apt-get update)"
    say "dpkg --add-architecture $ARCH; apt-get update"
    dpkg --add-architecture "$ARCH"
    apt-get update -qq
}

apt_lists_ready() { apt-cache show "busybox-static:$ARCH" >/dev/null 2>&1; }

# --- package resolution ------------------------------------------------------

# What the package versions depend on: apt's lists (their names, sizes and
# mtimes), the packages asked for and this script.
lists_key() {
    {
        echo "$ARCH ${KERNEL_PKG:-} ${APP_PACKAGES[*]}"
        sha256sum "${BASH_SOURCE[0]}"
        find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -printf '%f %s %T@\n' 2>/dev/null | LC_ALL=C sort
    } | sha256sum | cut -c1-16
}

# apt-cache parses every list on each call (this image keeps no pkgcache.bin),
# 1-9 s with two architectures; the answer is kept until the lists change.
resolve_packages() {
    local try key cache=$OUT/.packages
    key=$(lists_key)
    if [ "$FORCE" != 1 ] && [ -f "$cache" ] && [ "$(head -n1 "$cache")" = "# $key" ]; then
        # shellcheck source=/dev/null
        . "$cache"
        return
    fi
    for try in 1 2; do
        if query_packages; then
            {
                echo "# $key"
                printf 'KERNEL_PKG=%q KERNEL_VER=%q BUSYBOX_VER=%q\n' "$KERNEL_PKG" "$KERNEL_VER" "$BUSYBOX_VER"
                if [ ${#APP_VERS[@]} -gt 0 ]; then
                    printf 'APP_VERS=(%s)\n' "$(printf '%q ' "${APP_VERS[@]}")"
                else
                    echo 'APP_VERS=()'
                fi
            } >"$cache.tmp"
            mv "$cache.tmp" "$cache"
            return
        fi
        [ "$try" = 1 ] && [ "$(id -u)" -eq 0 ] || break
        say "apt does not know the guest packages yet: apt-get update"
        apt-get update -qq
    done
    die "apt knows no ${KERNEL_PKG:-linux-image-6.1.0-N-$ARCH}, busybox-static or" \
        "application package for $ARCH (run 'apt-get update' as root)"
}

# Set KERNEL_PKG (unless given), KERNEL_VER, BUSYBOX_VER and APP_VERS (the
# "pkg=version" of each APP_PACKAGES entry) from apt's lists.  Two apt-cache
# calls (each costs ~0.4 s): this is most of a warm build.
query_packages() {
    local kpkg=${KERNEL_PKG:-} versions p v
    if [ -z "$kpkg" ]; then
        # Newest ABI (the N in linux-image-6.1.0-N-amd64) first; at equal ABI
        # prefer -unsigned (the same kernel without the EFI signature).
        kpkg=$(apt-cache pkgnames linux-image-6.1.0- | awk -v arch="$ARCH" '
            $0 ~ "^linux-image-6\\.1\\.0-[0-9]+-" arch "(-unsigned)?$" {
                split($0, f, "-"); score = f[4] * 2 + ($0 ~ /-unsigned$/)
                if (score > best) { best = score; pkg = $0 }
            }
            END { print pkg }')
        [ -n "$kpkg" ] || return 1
    fi
    # apt-cache policy names foreign-architecture packages pkg:arch.
    versions=$(apt-cache policy "$kpkg:$ARCH" "busybox-static:$ARCH" "${APP_PACKAGES[@]/%/:$ARCH}" 2>/dev/null |
        awk '/^[^ ]/ { pkg = $1; sub(/:$/, "", pkg); sub(/:[a-z0-9]+$/, "", pkg) }
             /Candidate:/ { print pkg, $2 }')
    KERNEL_VER=$(awk -v p="$kpkg" '$1 == p && $2 != "(none)" { print $2 }' <<<"$versions")
    BUSYBOX_VER=$(awk '$1 == "busybox-static" && $2 != "(none)" { print $2 }' <<<"$versions")
    [ -n "$KERNEL_VER" ] && [ -n "$BUSYBOX_VER" ] || return 1
    APP_VERS=()
    for p in "${APP_PACKAGES[@]}"; do
        v=$(awk -v p="$p" '$1 == p && $2 != "(none)" { print $2 }' <<<"$versions")
        [ -n "$v" ] || { say "apt knows no $p:$ARCH"; return 1; }
        APP_VERS+=("$p=$v")
    done
    KERNEL_PKG=$kpkg
}

# Download PKG=VERSION into debs/ unless it is already there; print the path.
# An optional third argument names another architecture than $ARCH.
fetch_deb() {
    local pkg=$1 ver=$2 arch=${3:-$ARCH} f pattern
    pattern="${pkg}_${ver//:/%3a}_${arch}.deb"
    f=$(find "$OUT/debs" -maxdepth 1 -name "$pattern" | head -n1)
    if [ -z "$f" ]; then
        say "downloading $pkg:$arch $ver"
        (cd "$OUT/debs" && apt-get download -q "$pkg:$arch=$ver" 2>&1 |
            grep -v -e 'unsandboxed as root' -e '^W: .*pkgAcquire' >&2 || true)
        f=$(find "$OUT/debs" -maxdepth 1 -name "$pattern" | head -n1)
        [ -n "$f" ] || die "apt-get download $pkg=$ver failed"
        # Keep only the current version of each package.
        find "$OUT/debs" -maxdepth 1 -name "${pkg}_*_${arch}.deb" ! -path "$f" -delete
    fi
    printf '%s' "$f"
}

# --- kernel ------------------------------------------------------------------

# The bzImage wraps an xz stream holding the ELF vmlinux.  Booting that ELF
# directly (QEMU uses its PVH entry note) skips the in-guest decompression.
extract_vmlinux() {
    local bz=$1 out=$2 off
    say "extracting vmlinux from the bzImage (xz stream)"
    off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$bz" | head -n1 | cut -d: -f1 || true)
    if [ -n "$off" ]; then
        # xz stops at the end of the stream; tail then dies of SIGPIPE.
        { tail -c +"$((off + 1))" "$bz" || true; } |
            xz -dc --single-stream >"$out" 2>/dev/null || rm -f "$out"
    fi
    if [ ! -s "$out" ] || [ "$(head -c4 "$out" | od -An -tx1 | tr -d ' \n')" != 7f454c46 ]; then
        say "warning: no xz-compressed ELF inside the bzImage; the guest will boot the bzImage"
        rm -f "$out"
    fi
}

# Debian's arm64 vmlinuz is a gzip-compressed arm64 Image.  QEMU can load it
# gzipped, but then inflates it on every boot; do it once here.
unpack_arm64_image() {
    local in=$1 out=$2
    if [ "$(head -c2 "$in" | od -An -tx1 | tr -d ' \n')" = 1f8b ]; then
        gzip -dc "$in" >"$out"
    else
        cp "$in" "$out"
    fi
    # arm64 Image header: "ARM\x64" at offset 56 (Documentation/arm64/booting.rst).
    [ "$(tail -c +57 "$out" | head -c4)" = $'ARM\x64' ] || die "$in is not an arm64 Image"
}

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
    cp "$(find "$dir.tmp/pkg" -path '*/boot/config-*' | head -n1)" "$dir.tmp/config"
    if [ "$ARCH" = arm64 ]; then
        unpack_arm64_image "$vmlinuz" "$dir.tmp/Image"
    else
        cp "$vmlinuz" "$dir.tmp/bzImage"
        extract_vmlinux "$dir.tmp/bzImage" "$dir.tmp/vmlinux"
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

# --- applications ------------------------------------------------------------

# Print the path, inside package tree TREE, of the file that TREE/PATH names,
# following symlinks inside TREE (absolute links are relative to TREE).
resolve_in_tree() {
    local tree=$1 f=$1/$2 t n=0
    while [ -L "$f" ]; do
        n=$((n + 1))
        [ $n -le 16 ] || return 1
        t=$(readlink "$f")
        case $t in
            /*) f=$tree$t ;;
            *) f=$(dirname "$f")/$t ;;
        esac
    done
    [ -f "$f" ] && printf '%s' "$f"
}

# The package-tree path of shared library SONAME (the loader's search dirs).
find_lib() {
    local tree=$1 so=$2 d
    for d in lib/$TRIPLET usr/lib/$TRIPLET lib usr/lib lib64; do
        [ -e "$tree/$d/$so" ] || [ -L "$tree/$d/$so" ] || continue
        resolve_in_tree "$tree" "$d/$so" && return 0
    done
    return 1
}

needed() { readelf -dW "$1" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'; }
interpreter() { readelf -lW "$1" | sed -n 's/.*Requesting program interpreter: \(.*\)\]/\1/p'; }

# Copy TREE/PATH to ROOT/PATH with its loader and, transitively, every
# shared library it needs (into ROOT/lib/$TRIPLET, where the loader looks).
copy_elf() {
    local tree=$1 root=$2 path=$3 src interp so f queue=()
    src=$(resolve_in_tree "$tree" "$path") || die "$path is not in the application packages"
    mkdir -p "$root/$(dirname "$path")"
    cp "$src" "$root/$path"
    interp=$(interpreter "$src")
    if [ -n "$interp" ] && [ ! -e "$root$interp" ]; then
        f=$(find_lib "$tree" "$(basename "$interp")") || die "no loader $interp for $path"
        mkdir -p "$root$(dirname "$interp")"
        cp "$f" "$root$interp"
    fi
    mapfile -t queue < <(needed "$src")
    while [ ${#queue[@]} -gt 0 ]; do
        so=${queue[0]}
        queue=("${queue[@]:1}")
        [ -e "$root/lib/$TRIPLET/$so" ] && continue
        f=$(find_lib "$tree" "$so") ||
            die "$path needs $so, which no package of APP_PACKAGES has (add its package)"
        mkdir -p "$root/lib/$TRIPLET"
        cp "$f" "$root/lib/$TRIPLET/$so"
        mapfile -t -O ${#queue[@]} queue < <(needed "$f")
    done
}

build_apps() {
    [ ${#APP_PACKAGES[@]} -gt 0 ] || { rm -rf "$OUT/apps"; return 0; }
    # Bump APPS_RECIPE when this function changes what it produces.
    local key="recipe $APPS_RECIPE ${APP_VERS[*]} ${APP_BINARIES[*]}" dir=$OUT/apps pv deb b
    if [ "$FORCE" != 1 ] && [ -f "$dir/.stamp" ] && [ "$(cat "$dir/.stamp")" = "$key" ]; then
        say "applications: cached"
        return
    fi
    rm -rf "$dir" "$dir.tmp"
    mkdir -p "$dir.tmp/pkg" "$dir.tmp/root"
    for pv in "${APP_VERS[@]}"; do
        deb=$(fetch_deb "${pv%%=*}" "${pv#*=}")
        dpkg-deb -x "$deb" "$dir.tmp/pkg"
    done
    for b in "${APP_BINARIES[@]}"; do
        copy_elf "$dir.tmp/pkg" "$dir.tmp/root" "$b"
        say "  $b"
    done
    # git runs its subcommands (index-pack, ...) as `git CMD` from its exec
    # path, /usr/lib/git-core; users call it as /usr/bin/git.  An empty
    # template directory keeps `git init`/`clone` from warning.
    ln -s ../lib/git-core/git "$dir.tmp/root/usr/bin/git"
    mkdir -p "$dir.tmp/root/usr/share/git-core/templates"
    say "  libraries: $(ls "$dir.tmp/root/lib/$TRIPLET" | tr '\n' ' ')"
    (cd "$dir.tmp/root" && find . | LC_ALL=C sort |
        cpio -o -H newc --owner=0:0 --quiet) >"$dir.tmp/apps.cpio"
    rm -rf "$dir.tmp/pkg"
    echo "$key" >"$dir.tmp/.stamp"
    mv "$dir.tmp" "$dir"
}

# --- initramfs ---------------------------------------------------------------

libc_dev_version() {
    local p=libc6-dev
    [ "$ARCH" = amd64 ] || p=libc6-dev-$ARCH-cross
    dpkg-query -W -f='${Version}' "$p" 2>/dev/null || echo '?'
}

inputs_hash() {
    {
        echo "arch $ARCH kernel $KERNEL_PKG=$KERNEL_VER busybox $BUSYBOX_VER"
        echo "cc $CC $("$CC" -dumpfullversion) libc $(libc_dev_version)"
        [ -f "$OUT/apps/.stamp" ] && cat "$OUT/apps/.stamp"
        (cd "$ROOT" && sha256sum scripts/build-guest.sh qemu/init qemu/guest/*)
    } | sha256sum | cut -c1-16
}

build_initramfs() {
    local hash stamp=$OUT/.initramfs.stamp
    hash=$(inputs_hash)
    if [ "$FORCE" != 1 ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$hash" ] &&
            [ -f "$OUT/initramfs.cpio.gz" ] &&
            { [ ! -d "$OUT/apps" ] || [ -f "$OUT/initramfs-apps.cpio" ]; }; then
        say "initramfs $hash: cached"
        return
    fi
    local deb root=$OUT/rootfs
    deb=$(fetch_deb busybox-static "$BUSYBOX_VER")
    rm -rf "$root" "$OUT/busybox"
    mkdir -p "$OUT/busybox" "$root"/{bin,sbin,dev,proc,sys,tmp,run,etc,lib/modules}
    dpkg-deb -x "$deb" "$OUT/busybox"
    cp "$OUT/busybox/bin/busybox" "$root/bin/busybox"
    # One symlink per applet.  The static busybox runs on the host too; for
    # another architecture, the amd64 build of the same version lists them.
    local applet lister=$root/bin/busybox
    if [ "$ARCH" != amd64 ]; then
        mkdir -p "$OUT/busybox-host"
        dpkg-deb -x "$(fetch_deb busybox-static "$BUSYBOX_VER" amd64)" "$OUT/busybox-host"
        lister=$OUT/busybox-host/bin/busybox
    fi
    for applet in $("$lister" --list); do
        [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
    done
    cp "$OUT"/kernel/modules/*.ko "$OUT/kernel/modules/order" "$root/lib/modules/"
    install -m 0755 "$SRC/init" "$root/init"

    local c prog
    mkdir -p "$OUT/guest"
    for c in "$SRC"/guest/*.c; do
        prog=$(basename "$c" .c)
        say "compiling guest/$prog.c"
        "$CC" -static -O2 -Wall -Wextra -Werror -s -o "$OUT/guest/$prog" "$c"
        cp "$OUT/guest/$prog" "$root/bin/$prog"
    done

    say "packing initramfs.cpio.gz"
    (cd "$root" && find . | LC_ALL=C sort |
        cpio -o -H newc --owner=0:0 --quiet) | gzip -6n >"$OUT/initramfs.cpio.gz.tmp"
    mv "$OUT/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"
    if [ -d "$OUT/apps" ]; then
        cat "$OUT/apps/apps.cpio" "$OUT/initramfs.cpio.gz" >"$OUT/initramfs-apps.cpio.tmp"
        mv "$OUT/initramfs-apps.cpio.tmp" "$OUT/initramfs-apps.cpio"
    else
        rm -f "$OUT/initramfs-apps.cpio"
    fi
    echo "$hash" >"$stamp"
}

write_manifest() {
    apps=
    rm -f "$OUT/vmlinux" "$OUT/bzImage" "$OUT/Image"
    if [ "$ARCH" = arm64 ]; then
        ln -sfn kernel/Image "$OUT/Image"
        kernel=$OUT/Image
    elif [ -f "$OUT/kernel/vmlinux" ]; then
        ln -sfn kernel/vmlinux "$OUT/vmlinux"
        ln -sfn kernel/bzImage "$OUT/bzImage"
        kernel=$OUT/vmlinux
    else
        ln -sfn kernel/bzImage "$OUT/bzImage"
        kernel=$OUT/bzImage
    fi
    [ -f "$OUT/initramfs-apps.cpio" ] && apps=$OUT/initramfs-apps.cpio
    cat >"$OUT/image.env.tmp" <<EOF
ARCH=$ARCH
KERNEL=$kernel
INITRD=$OUT/initramfs.cpio.gz
INITRD_APPS=$apps
KERNEL_VERSION=$(cat "$OUT/kernel/release")
KERNEL_PKG=$KERNEL_PKG=$KERNEL_VER
BUSYBOX_PKG=busybox-static=$BUSYBOX_VER
APP_PKGS=${APP_VERS[*]}
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
    build_apps
    build_initramfs
    write_manifest
    say "done in $(elapsed) s: $kernel ($(cat "$OUT/kernel/release")), $OUT/initramfs.cpio.gz ($(du -k "$OUT/initramfs.cpio.gz" | cut -f1) KiB)${apps:+, $apps ($(du -k "$apps" | cut -f1) KiB)}"
}

main "$@"
