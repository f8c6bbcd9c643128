#!/usr/bin/env bash
# setup.sh: install what vhostnet's development and tests need.  Idempotent.
#
#   apt (Debian 12): qemu-system-x86   QEMU 7.2, boots the test guest
#                    tshark tcpdump    capture and decode the guest's frames
#                    iperf3            throughput benchmarks
#                    passt             a reference vhost-user backend to compare with
#                    u-boot-qemu       U-Boot for QEMU: a second virtio-net driver and a
#                                      real DHCP/TFTP client (tests/test_qemu_services.py)
#                    gcc libc6-dev     static guest test programs (scripts/build-guest.sh)
#                    xz-utils cpio     unpack the guest kernel, pack the initramfs
#                    dpdk-dev librte-net-virtio23
#                                      DPDK's virtio-user as a second frontend;
#                                      optional: skipped when apt does not have it
#   pip:             this package, editable, with its test extras (.[test])
#
# apt is skipped when every package is already installed; it needs root.
# pip goes to the Python given by $PYTHON (default python3); when that one is
# Debian's externally-managed system Python, a .venv/ is made and used instead
# (`make` picks .venv/bin/python up by itself).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}

REQUIRED=(qemu-system-x86 tshark tcpdump iperf3 passt gcc libc6-dev xz-utils cpio make u-boot-qemu)
OPTIONAL=(dpdk-dev librte-net-virtio23)

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

setup_apt
setup_python
say "done"
