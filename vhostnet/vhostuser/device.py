"""The contract between the vhost-user backend and a device.

The backend (backend.py) and the server (server.py) know rings, memory and
notifications; a device knows what the bytes in the rings mean. They meet
only here, as rust-vmm's `VhostUserBackend` trait does: the backend asks
the device what it offers and tells it what was negotiated; the server
hands it the rings when a kick arrives or a deadline passes.

A device never keeps the backend: it is given the rings on every call, so
there is no back-reference to wire after construction.
"""
from __future__ import annotations

from typing import Protocol, Sequence

from vhostnet.virtio.ring import Ring

__all__ = ["Device"]


class Device(Protocol):
    #: How many virtqueues the device has, and their names for logs and tools.
    num_queues: int
    queue_names: Sequence[str]
    #: virtio feature bits the device offers (virtio 1.2 §2.2).
    device_features: int
    #: What GET_QUEUE_NUM answers (PROTOCOL_F_MQ): virtio-net's queue pairs, as
    #: QEMU's net/vhost-user.c reads it. A device without it answers num_queues.
    vhost_queue_num: int

    def set_features(self, features: int) -> None:
        """The driver's acked features (0 on reset)."""

    def set_mtu(self, mtu: int) -> None:
        """VHOST_USER_NET_SET_MTU."""

    def get_config(self, offset: int, size: int) -> bytes:
        """Bytes of the device config space (virtio 1.2 §4.1.4.3)."""

    def process(self, rings: Sequence[Ring], index: int, now: float) -> bool:
        """Work on ring INDEX after a kick or a poll; bounded. True if more is waiting."""

    def poll(self, rings: Sequence[Ring], now: float) -> None:
        """A deadline of next_deadline() passed: run timers, deliver what they made."""

    def next_deadline(self) -> float | None:
        """When poll() wants to run next, on trio's clock, or None."""

    async def run(self, rings: Sequence[Ring], after_work) -> None:
        """Device-side tasks for the life of the connection (vhostnet's host
        proxy), in the connection's nursery; return at once if there are none.
        `after_work()` re-arms the timer after work done outside process/poll."""

    def idle_watch_fds(self) -> tuple[int, ...]:
        """Fds of the device's own tasks (its host sockets) that a kick
        waiter's idle poll (idle_poll.py) gives way to; optional."""

    def describe(self) -> dict:
        """JSON-able state for the inspection tools."""
