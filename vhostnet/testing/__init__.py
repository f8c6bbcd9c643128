"""Front-ends for tests and benchmarks.

    frontend.py  an in-process vhost-user front-end and guest driver (real memfd, eventfds, socket)
    dpdk.py      DPDK's dpdk-testpmd (virtio-user) as a second, independent front-end
    guest.py     a backend process and real QEMU guests (the Linux test image, U-Boot)
    restarts.py  the reconnect scenarios: QEMU killed under a backend, and the reverse
    hostservers.py  real iperf3 / redis-server / git daemon on 127.0.0.1 for the guest's application tests
"""
