"""Link layers: what sits on the wire between the virtio-net device and the stack.

    device (guest-side taps) -> FaultInjector -> StackTaps -> Stack
    device (guest-side taps) <- FaultInjector <- StackTaps <- Stack

As smoltcp's `phy` middleware wraps a device, each layer here wraps the
next one and speaks the same sans-IO interface as `stack.Stack` (the
`Link` protocol below): frames and `now` go in, frames and the next
deadline come out. The device talks to the outermost layer only; a layer
does its one job and hands frames on, so fault injection and capture are
layers on the link, not `if` statements in the device's data path.

Direction names follow the device: "tx" is guest -> stack (what the guest
transmitted), "rx" is stack -> guest.

- faults.py   FaultInjector: loss, duplication, reordering, corruption,
              delay with jitter, rate limit; per direction, seeded.
- spec.py     the fault grammar (`loss=5%,delay=20ms,...`), parsed once.
- taps.py     StackTaps: capture on the stack's side of the fault layer
              (`vhostnet capture --at stack`).
- cli.py      `vhostnet fault set|clear|show`, `serve --fault`.

`LinkSettings` is what outlives one QEMU connection and is shared with the
control socket: the faults in force and the stack-side tap list. The
composition root (vhostnet/launch/serve.py) makes one and gives every
connection's device `compose`, which builds that connection's layers.
"""
from __future__ import annotations

from typing import Callable, Iterator, Protocol

from stack import Frame

__all__ = ["Link", "LinkSettings", "compose", "layers"]


class Link(Protocol):
    """The stack's sans-IO surface, which every link layer also offers."""

    def receive(self, frame: Frame, now: float) -> None:
        """A frame from the guest. FRAME.data may be a view of guest memory,
        valid only during this call: a layer that keeps it copies it."""

    def receiver(self, now: float) -> Callable[[Frame, float], None]:
        """What to call with the frames of one TX batch at NOW: this layer's
        receive, or, when the layer has nothing to do to them (no faults in
        force, no taps), the next layer's receiver. The device asks once per
        batch, so a layer that only hands frames on costs nothing per frame;
        nothing a layer decides on changes inside a batch (settings change
        from the control socket, between the loop's steps)."""

    def take_frames(self) -> list[Frame]:
        """Frames for the guest, ready now."""

    def poll(self, now: float) -> None:
        """A deadline of next_deadline() passed."""

    def next_deadline(self) -> float | None:
        """When poll() wants to run next (trio's clock), or None."""


class LinkSettings:
    """Link state shared by the control socket and every connection's layers."""

    def __init__(self, faults=None, stack_taps: list | None = None):
        from vhostnet.link.faults import FaultSettings
        self.faults = faults if faults is not None else FaultSettings()
        # Taps on the stack's side of the fault layer, tap(direction, frame),
        # as the device's own taps are on the guest's side.
        self.stack_taps: list = stack_taps if stack_taps is not None else []

    def compose(self, stack) -> Link:
        """One connection's layers around its stack; the device talks to the result."""
        from vhostnet.link.faults import FaultInjector
        from vhostnet.link.taps import StackTaps
        return FaultInjector(StackTaps(stack, self.stack_taps), self.faults)


def compose(settings: LinkSettings, stack) -> Link:
    return settings.compose(stack)


def layers(link) -> Iterator:
    """The layers from LINK inwards, ending with the stack itself."""
    while link is not None:
        yield link
        link = getattr(link, "inner", None)
