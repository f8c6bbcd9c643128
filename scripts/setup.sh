#!/usr/bin/env bash
# setup.sh: install what vhostnet's development and tests need.  Idempotent.
#
#   apt (Debian 12): qemu-system-x86   QEMU 7.2, boots the test guest
#                    tshark tcpdump    capture and decode the guest's frames
#                    iperf3            throughput benchmarks; the guest's iperf3 test server
#                    redis-server git  host servers for the guest's redis-cli and git tests
#                    qemu-system-arm   QEMU 7.2 for aarch64: the arm64 test guest and U-Boot on virt
#                    u-boot-qemu       U-Boot builds for QEMU: a second, fast-booting driver
#                                      (tests/test_uboot.py, the QEMU restart tests)
#                    gcc-aarch64-linux-gnu libc6-dev-arm64-cross
#                                      static arm64 guest test programs (GUEST_ARCH=arm64)
#                    passt             a reference vhost-user backend to compare with
#                    gcc libc6-dev     static guest test programs (scripts/build-guest.sh),
#                                      and the cffi extension stack.native._native
#                    python3-dev       Python headers for that extension (pip install builds it)
#                    xz-utils cpio     unpack the guest kernel, pack the initramfs
#                    dpdk-dev librte-net-virtio23 librte-net-vhost23
#                                      DPDK: virtio-user as a second frontend, and the
#                                      vhost back-end of bench_qemu.py's floor row;
#                                      optional: skipped when apt does not have it
#                    qemu-system-misc opensbi
#                                      QEMU 7.2 for riscv64 and OpenSBI (its -bios) for the
#                                      README's riscv64 walk-through; optional, no test needs them
#   pip:             this package, editable, with its test extras (.[test])
#   discovery:       QEMU's vhost-user discovery file, 50-vhostnet.json (type
#                    net, naming the vhostnet-backend just installed), in
#                    /usr/share/qemu/vhost-user as root, else in
#                    $XDG_CONFIG_HOME/qemu/vhost-user; skipped with DISCOVERY=0
#
# apt is skipped when every package is already installed; it needs root.
# pip goes to the Python given by $PYTHON (default python3); when that one is
# Debian's externally-managed system Python, a .venv/ is made and used instead
# (`make` picks .venv/bin/python up by itself).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}

REQUIRED=(qemu-system-x86 qemu-system-arm u-boot-qemu ipxe tshark tcpdump iperf3 redis-server git passt
          gcc libc6-dev python3-dev gcc-aarch64-linux-gnu libc6-dev-arm64-cross xz-utils cpio make iproute2 util-linux)
OPTIONAL=(dpdk-dev librte-net-virtio23 librte-net-vhost23 qemu-system-misc opensbi)

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
available() { apt-cache show "$1" >/dev/null 2>&1; }

apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Use-Pty=0 "$@" </dev/null | grep -E '^(Setting up|E:)' | sed 's/^/setup:   /' || true
}

setup_apt() {
    command -v dpkg-query >/dev/null || { say "not a Debian host: install the packages yourself: ${REQUIRED[*]}"; return; }
    local missing=() optional=() p
    for p in "${REQUIRED[@]}"; do installed "$p" || missing+=("$p"); done
    for p in "${OPTIONAL[@]}"; do installed "$p" || optional+=("$p"); done
    if [ ${#missing[@]} -eq 0 ] && [ ${#optional[@]} -eq 0 ]; then
        say "apt: all packages present"
        return
    fi
    [ "$(id -u)" -eq 0 ] || die "missing packages: ${missing[*]} ${optional[*]} (run as root, or: sudo apt-get install ${missing[*]})"
    say "apt: updating package lists"
    apt-get update -qq
    if [ ${#missing[@]} -gt 0 ]; then
        say "apt: installing ${missing[*]}"
        apt_install "${missing[@]}"
        for p in "${missing[@]}"; do installed "$p" || die "apt could not install $p"; done
    fi
    if [ ${#optional[@]} -gt 0 ]; then
        local ok=()
        for p in "${optional[@]}"; do
            if available "$p"; then ok+=("$p"); else say "apt: $p not available here; skipped (optional)"; fi
        done
        if [ ${#ok[@]} -gt 0 ]; then
            say "apt: installing optional ${ok[*]}"
            apt_install "${ok[@]}" || true
            for p in "${ok[@]}"; do installed "$p" || say "apt: optional $p failed to install; skipped"; done
        fi
    fi
}

externally_managed() {
    "$1" - <<'EOF'
import os, sys, sysconfig
stdlib = sysconfig.get_path("stdlib")
sys.exit(0 if sys.prefix == sys.base_prefix and os.path.exists(os.path.join(stdlib, "EXTERNALLY-MANAGED")) else 1)
EOF
}

setup_python() {
    local py=$PYTHON
    command -v "$py" >/dev/null || die "$py not found"
    if externally_managed "$py"; then
        if [ ! -x "$ROOT/.venv/bin/python" ]; then
            say "python: $py is externally managed; creating .venv"
            if ! "$py" -m venv "$ROOT/.venv" 2>/dev/null; then
                [ "$(id -u)" -eq 0 ] || die "$py -m venv failed: install python3-venv"
                say "apt: installing python3-venv"
                apt_install python3-venv
                rm -rf "$ROOT/.venv"
                "$py" -m venv "$ROOT/.venv"
            fi
        fi
        py=$ROOT/.venv/bin/python
    fi
    "$py" -m pip --version >/dev/null 2>&1 || die "$py has no pip (install python3-pip or python3-venv)"
    say "pip: installing vhostnet (editable) with its test extras into $("$py" -c 'import sys; print(sys.prefix)')"
    (cd "$ROOT" && "$py" -m pip install -q --disable-pip-version-check --root-user-action=ignore -e '.[test]')
}

# QEMU's backend program conventions: management tools find backends through
# discovery files (docs/interop/vhost-user.json). The file names the absolute
# path of vhostnet-backend, which only exists once pip has installed it.
setup_discovery() {
    [ "${DISCOVERY:-1}" = 1 ] || { say "discovery: skipped (DISCOVERY=0)"; return; }
    local py=$PYTHON where=()
    [ -x "$ROOT/.venv/bin/python" ] && py=$ROOT/.venv/bin/python
    [ "$(id -u)" -eq 0 ] || where=(--user)
    "$py" -m vhostnet install-discovery "${where[@]}" 2>&1 | sed 's/^/setup: /' ||
        say "discovery: not written (vhostnet install-discovery failed; see above)"
}

setup_apt
setup_python
setup_discovery
say "done"
