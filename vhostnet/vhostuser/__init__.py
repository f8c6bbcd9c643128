"""The vhost-user layer: what QEMU's side of the socket speaks, no virtio-net.

    protocol.py  the messages (QEMU docs/interop/vhost-user.rst), declared with construct
    channel.py   message framing and SCM_RIGHTS fds on the Unix socket
    memory.py    guest memory regions (SET_MEM_TABLE) and checked address translation
    device.py    the contract a device implements for the backend (typing.Protocol)
    backend.py   one connection's state machine: features, memory, ring set-up; no I/O
    server.py    trio: one nursery per connection, kick waiters, the device's timers

Like rust-vmm's `vhost` + `vhost-user-backend` crates: this package knows
rings and memory, and drives whatever device implements `device.Device`.
"""
