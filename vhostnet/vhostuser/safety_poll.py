"""The safety poll: find what a driver made available without a kick.

Some drivers miss kicks: rcore-os/virtio-drivers stops notifying when its
16-bit avail index wraps with EVENT_IDX (it compares indices without
wrap-around), and a device that only waits on the kick eventfd then stalls
for ever. So while a queue is active, its avail ring is looked at every
INTERVAL (5 ms) as well.

One look (`tick`) compares avail->idx with the furthest position the device
knows of: the avail index at the last kick, what the device has taken
(last_avail_idx), what pop() last saw, and what the previous look took.
Entries past that which were already there at the previous look, with no
kick in between (a driver between its idx store and its kick gets one
whole INTERVAL), are *unkicked*: counted in the queue's `unkicked` stat and
handed to the device at once, so traffic goes on.

Whether the driver broke a rule by not kicking is a separate question
(virtio 1.2 §2.7.10.1): only if notifications were enabled for that move
(no EVENT_IDX: used->flags without NO_NOTIFY; EVENT_IDX: the move crossed
the avail_event the device wrote). Such a look is a *suspect*, confirmed as
a `kick_missed` finding after LATE_KICK_GRACE unless the driver's own kick
arrives meanwhile, only late: a driver may publish a batch entry by entry
and kick once at its end (Linux fills a 1024-entry RX ring so, which takes
longer than INTERVAL under TCG), or its vCPU may be descheduled between its
idx store and its kick on a loaded host. Any kick within the grace period
is taken as that late kick, unless the device's handling of the suspect
entries moved avail_event: then a kick can be the driver reacting to the new
avail_event (rcore's broken check starts kicking again once avail_event
wraps too), and only a kick with nothing new in the ring counts as late.

Cost: a look is a few reads of guest memory (about 5 µs). The poll stops
after QUIET_AFTER with nothing new in the ring and no kick, so an idle
guest costs next to nothing; the next kick or device work on any queue of
the connection (`wake`) resumes it. While parked it still takes one look
every IDLE_LOOK (1 s): a driver that misses the very first kick after a
quiet spell, with nothing else to wake the device, would otherwise stall
for ever (seen with the in-process frontend: an unkicked frame 0.3 s after
the last kick was never sent). One look a second is about 0.003% of a core.
"""
from __future__ import annotations

import trio

__all__ = ["SafetyPoll", "INTERVAL", "QUIET_AFTER", "LATE_KICK_GRACE", "IDLE_LOOK"]

#: How often an active queue's avail ring is looked at, in seconds.
INTERVAL = 0.005
#: Stop looking after this long with nothing new and no kick.
QUIET_AFTER = 0.25
#: A kick this late, with nothing new in the ring, was the driver's own: no finding.
LATE_KICK_GRACE = 1.0
#: While parked: one look this often, so a missed first kick stalls a ring at most this long.
IDLE_LOOK = 1.0


class SafetyPoll:
    """The safety poll of one queue. `drain(q)` (async) hands the ring to the device."""

    def __init__(self, q, drain, clock=trio.current_time):
        self.q = q
        self.drain = drain
        self.clock = clock
        self.kick_seen: int | None = None   # avail->idx at the last kick
        self.looked: int | None = None      # avail->idx the last look handed over
        self.unkicked_prev = False          # the previous look saw unkicked entries
        self.kicks_prev = q.stats["kicks"]
        self.activity = None                # (avail->idx, kicks, used_idx) at the last look
        self.suspect = None                 # (time, avail->idx, detail, example)
        self.busy = 0                       # the kick task is draining this ring
        self.looking = False                # polling now (False: parked until a kick or work)
        self._wake = trio.Event()

    # -- called by the server ------------------------------------------------

    def kicked(self) -> None:
        """A kick arrived on this ring (before the device drains it)."""
        q = self.q
        if not q.mapped or q.packed:   # split-ring indices only; packed rings go unpolled
            return
        n = q.avail_idx()
        s = self.suspect
        if s is not None and self.clock() - s[0] < LATE_KICK_GRACE and (n == s[1] or not s[4]):
            self.suspect = None   # the driver's own kick, late: nothing was missed
        self.kick_seen = n
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    def close(self) -> None:
        """The ring stops or the connection ends: no late kick can come any more."""
        if self.q.packed:
            return
        self._confirm(force=True)

    # -- the loop ----------------------------------------------------------------

    async def run(self) -> None:
        while True:
            quiet_since = self.clock()
            self.looking = True
            while True:
                await trio.sleep(INTERVAL)
                now = self.clock()
                if await self.tick(now):
                    quiet_since = now
                elif now - quiet_since >= QUIET_AFTER:
                    break
            self.looking = False
            await self._parked()

    async def _parked(self) -> None:
        """Until a kick or device work wakes us, or an idle look finds the ring moved."""
        while True:
            self._wake = trio.Event()
            with trio.move_on_after(IDLE_LOOK):
                await self._wake.wait()
                return
            # Two idle looks in a row see an entry no kick announced (tick's rule).
            if await self.tick(self.clock()) or self.unkicked_prev:
                if self.unkicked_prev:
                    await trio.sleep(INTERVAL)
                    await self.tick(self.clock())
                return

    async def tick(self, now: float) -> bool:
        """One look; True if the ring moved (or was kicked) since the previous one."""
        q = self.q
        self._confirm(now=now)
        if not q.ready:
            self.unkicked_prev = False
            return False
        n = q.avail_idx()
        kicks = q.stats["kicks"]
        state = (n, kicks, q.used_idx)
        moved = state != self.activity
        self.activity = state
        if self.busy:
            self.unkicked_prev = False
            return True
        known = self._known()
        new = (n - known) & 0xFFFF
        if new == 0 or new > q.num:   # nothing unannounced (or a jump: pop() names that)
            self.unkicked_prev = False
            self.kicks_prev = kicks
            return moved
        if not (self.unkicked_prev and kicks == self.kicks_prev):
            self.unkicked_prev = True   # give the driver one INTERVAL to kick
            self.kicks_prev = kicks
            return True
        self.unkicked_prev = False
        q.stats["unkicked"] += new
        suspect = q.must_notify(known, n)
        event_before = q.avail_event()
        self.looked = n
        await self.drain(q)
        if suspect:
            self._confirm(force=True)
            # (time, avail->idx, detail, example, the device moved avail_event meanwhile)
            self.suspect = (now, n, f"avail->idx moved from {known} to {n} with notifications enabled "
                                    f"and no kick for {INTERVAL * 1000:.0f} ms or more",
                            {"avail_idx": n, "device_knew": known, "entries": new,
                             "event_idx": q.event_idx, "avail_event": event_before,
                             "expected": "a notification (kick)", "seen": "none"},
                            q.avail_event() != event_before)
        return True

    def _known(self) -> int:
        """The furthest avail position the device knows of (mod 2^16, relative to last_avail_idx)."""
        q = self.q
        last = q.last_avail_idx
        best = last
        for pos in (self.kick_seen, self.looked, q.avail_seen):
            if pos is not None and ((pos - last) & 0xFFFF) <= q.num and \
                    ((pos - last) & 0xFFFF) > ((best - last) & 0xFFFF):
                best = pos
        return best

    def _confirm(self, now: float | None = None, force: bool = False) -> None:
        s = self.suspect
        if s is None or not (force or now - s[0] >= LATE_KICK_GRACE):
            return
        self.suspect = None
        self.q.count_error("kick_missed", s[2], **s[3])
