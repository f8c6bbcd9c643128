"""StackTaps: capture frames on the stack's side of the fault layer.

The device's own taps (NetDevice.taps, the server's list) see the guest's
side: frames as the guest sent them ("tx") and as the guest received them
("rx"). This layer sits between the fault layer and the stack and calls
the taps in LinkSettings.stack_taps with what the stack received ("tx",
after loss, corruption, delay...) and what it sent ("rx", before them).
`vhostnet capture --at stack` installs its tap here; comparing the two
captures shows every fault.

A tap is `tap(direction, frame)` and copies what it keeps (the frame may
be a view of guest memory). An empty list costs one loop per frame.
"""
from __future__ import annotations

from stack import Frame

__all__ = ["StackTaps"]


class StackTaps:
    def __init__(self, inner, taps: list):
        self.inner = inner
        self.taps = taps     # the caller's list: a capture outlives a connection

    def receive(self, frame: Frame, now: float) -> None:
        for tap in self.taps:
            tap("tx", frame)
        self.inner.receive(frame, now)

    def receiver(self, now: float):
        """receive while a tap is installed, else the stack's receiver."""
        return self.receive if self.taps else self.inner.receiver(now)

    def take_frames(self) -> list[Frame]:
        out = self.inner.take_frames()
        if self.taps:
            for f in out:
                for tap in self.taps:
                    tap("rx", f)
        return out

    def poll(self, now: float) -> None:
        self.inner.poll(now)

    def next_deadline(self) -> float | None:
        return self.inner.next_deadline()
