# vhostnet: common tasks.  `make help` lists them.
#
# Python: .venv/bin/python when scripts/setup.sh made one (Debian's system
# Python is externally managed), else python3; override with PYTHON=...

PYTHON ?= $(if $(wildcard .venv/bin/python),.venv/bin/python,python3)

.PHONY: help setup guest demo demo-apps test check test-qemu-smoke bench

help:
	@echo "make setup            install apt packages (root) and pip install -e '.[test]'"
	@echo "make guest            build the QEMU test guest into qemu/build/ (cached)"
	@echo "make demo             setup + guest, then boot the test guest on vhostnet (vhostnet run)"
	@echo "make demo-apps        the guest runs iperf3, redis-cli and git against host servers"
	@echo "                      (needs NAT: BACKEND=slirp make demo-apps until vhostnet has it)"
	@echo "make test             setup, then run the whole pytest suite (includes the QEMU guests)"
	@echo "make check            the pytest suite alone, without the setup step"
	@echo "make test-qemu-smoke  boot the guest on a vhostnet backend and check its markers"
	@echo "                      e.g. NET=1 TCP_ECHO_TEST=1 make test-qemu-smoke; BACKEND=slirp ..."
	@echo "                      NET=1 IPERF_TEST=1 REDIS_TEST=1 GIT_TEST=1 make test-qemu-smoke"
	@echo "make bench            run every scripts/bench_*.py"

setup:
	bash scripts/setup.sh

guest:
	bash scripts/build-guest.sh

# The two commands of the README. Both install what a fresh machine lacks
# first; the sub-make re-reads PYTHON, which setup may have just created.
demo: setup guest
	$(MAKE) --no-print-directory run-guest

run-guest:
	$(PYTHON) -m vhostnet run

# iperf3, redis-cli and git in the guest against iperf3 -s, redis-server and
# git daemon on 127.0.0.1, through the backend's NAT (BACKEND=slirp: QEMU's).
demo-apps: setup guest
	NET=1 IPERF_TEST=1 REDIS_TEST=1 GIT_TEST=1 ICMP_TEST=0 TCP_ECHO_TEST=0 UDP_ECHO_TEST=0 \
		NET_LOOPBACK_TEST=0 $(PYTHON) qemu/smoke.py

test: setup
	$(MAKE) --no-print-directory check

check:
	$(PYTHON) -m pytest

# The smoke runner reads NET, EXPECT_NET, ICMP_TEST, TCP_ECHO_TEST,
# UDP_ECHO_TEST, NET_LOOPBACK_TEST, IPERF_TEST, REDIS_TEST, GIT_TEST, BACKEND,
# MACHINE, TRANSPORT, LEGACY, QUEUE_SIZE, SMOKE_TIMEOUT, ACCEL and BACKEND_ARGS
# from the environment (see qemu/smoke.py).
test-qemu-smoke:
	$(PYTHON) qemu/smoke.py

bench:
	@set -e; for b in scripts/bench_*.py; do \
		echo "== $$b"; $(PYTHON) $$b; \
	done
