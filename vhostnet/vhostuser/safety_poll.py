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

Packed rings (`PackedSafetyPoll`) have no avail index to compare: the
driver makes a descriptor available by flipping its flags (virtio 1.2
§2.8.1). The furthest position the device knows of is the furthest of
where it takes next (last_avail_idx and its wrap counter), where pop() last
found nothing, and what the previous look handed over; an entry is there
when the descriptor at that position has AVAIL equal to the wrap counter
and USED not. The same two-look rule, drain and grace period follow. The
driver had to notify if our event suppression structure (§2.8.14) said
ENABLE, or DESC at a position the new entries cover (EVENT_IDX): then a
missed kick is `packed_kick_missed`.

Under `vhostnet serve` and `run` the kick hook (kick_hook.py) runs the
looks, where trio would sleep: a look is then a function call, not a trio
task's wake and sleep (a scheduler pass each). The poll's task wakes only
for what a look found, to park, or, when trio has not slept for FALLBACK
(so the hook ran no look), to look itself.

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

from vhostnet.virtio.packed import RING_EVENT_FLAGS_DESC, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_ENABLE

__all__ = ["SafetyPoll", "PackedSafetyPoll", "safety_poll_for", "INTERVAL", "QUIET_AFTER", "LATE_KICK_GRACE", "IDLE_LOOK"]

#: How often an active queue's avail ring is looked at, in seconds.
INTERVAL = 0.005
#: Stop looking after this long with nothing new and no kick.
QUIET_AFTER = 0.25
#: A kick this late, with nothing new in the ring, was the driver's own: no finding.
LATE_KICK_GRACE = 1.0
#: While parked: one look this often, so a missed first kick stalls a ring at most this long.
IDLE_LOOK = 1.0
#: With the kick hook running the looks: if trio has not slept for this long
#: (so the hook ran none), the poll's task looks itself.
FALLBACK = 4 * INTERVAL


class SafetyPoll:
    """The safety poll of one queue. `drain(q)` (async) hands the ring to the device."""

    def __init__(self, q, drain, clock=trio.current_time, hook=None):
        self.q = q
        self.hook = hook                    # a KickClock (kick_hook.py): it runs the looks
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
        self.failed = False                 # raised once (a bug): the server stopped using it
        self._wake = trio.Event()

    # -- called by the server ------------------------------------------------

    def kicked(self) -> None:
        """A kick arrived on this ring (before the device drains it)."""
        q = self.q
        if not q.mapped:
            return
        n = self._avail_now()
        s = self.suspect
        if s is not None and self.clock() - s[0] < LATE_KICK_GRACE and (n == s[1] or not s[4]):
            self.suspect = None   # the driver's own kick, late: nothing was missed
        self.kick_seen = n
        self.wake()

    def wake(self) -> None:
        # Every kick wakes every poll of the connection; trio's Event.set is
        # the dearer call (KI protection), and mostly the event is set already.
        w = self._wake
        if not w.is_set():
            w.set()

    def close(self) -> None:
        """The ring stops or the connection ends: no late kick can come any more."""
        self._confirm(force=True)

    # -- the loop ----------------------------------------------------------------

    async def run(self) -> None:
        while True:
            self.looking = True
            if self.hook is not None:
                await self._look_from_hook()
            else:
                await self._look_from_task()
            self.looking = False
            await self._parked()

    async def _look_from_task(self) -> None:
        """A look every INTERVAL from this task, until QUIET_AFTER of nothing."""
        quiet_since = self.clock()
        while True:
            await trio.sleep(INTERVAL)
            now = self.clock()
            if await self.tick(now):
                quiet_since = now
            elif now - quiet_since >= QUIET_AFTER:
                return

    async def _look_from_hook(self) -> None:
        """The same looks, run by the kick hook where trio would sleep: no
        scheduler pass per look (issue 12: in a real guest's 3 s ping test
        2 trio passes instead of 550, in its UDP test 320 instead of 700-1,000).
        This task wakes only for what a look found, for the end of the
        looking spell, or, if trio never slept for FALLBACK, to look itself."""
        self._quiet_since = self.clock()
        while True:
            # What the hook's look ended the wait with: ("found", entries),
            # ("quiet",) or ("failed", exception); None: the guard fired.
            self._outcome = None
            self._done = done = trio.Event()
            with trio.move_on_after(FALLBACK) as guard:
                self._guard = guard
                token = self.hook.at(self.clock() + INTERVAL, self._hook_look, self._hook_failed)
                if token is None:           # the hook is off after all
                    self.hook = None
                    return await self._look_from_task()
                try:
                    await done.wait()
                finally:
                    self.hook.cancel(token)
            out = self._outcome
            now = self.clock()
            if out is None:                 # trio busy throughout: look from here
                if await self.tick(now):
                    self._quiet_since = now
                elif now - self._quiet_since >= QUIET_AFTER:
                    return
            elif out[0] == "found":
                await self._hand_over(now, out[1])
                self._quiet_since = now
            elif out[0] == "failed":
                raise out[1]
            else:
                return

    def _hook_look(self, now: float) -> float | None:
        """A look from the hook: when to look next, or None (the task goes on)."""
        moved, found = self.look(now)
        if moved:
            self._quiet_since = now
        if found is not None:
            self._outcome = ("found", found)
        elif now - self._quiet_since >= QUIET_AFTER:
            self._outcome = ("quiet",)
        else:
            self._guard.deadline = now + FALLBACK
            return now + INTERVAL
        self._done.set()
        return None

    def _hook_failed(self, e: BaseException) -> None:
        self._outcome = ("failed", e)
        self._done.set()

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
        moved, found = self.look(now)
        if found is not None:
            await self._hand_over(now, found)
        return moved

    def look(self, now: float) -> tuple[bool, tuple | None]:
        """One look, without handing anything over: (moved, found). FOUND,
        when not None, are unkicked entries for _hand_over()."""
        q = self.q
        self._confirm(now=now)
        if not q.ready:
            self.unkicked_prev = False
            return False, None
        n = self._avail_now()
        kicks = q.stats["kicks"]
        state = (n, kicks, q.used_idx)
        moved = state != self.activity
        self.activity = state
        if self.busy:
            self.unkicked_prev = False
            return True, None
        known = self._known()
        new = self._new(known, n)
        if new == 0:   # nothing unannounced (or a jump: pop() names that)
            self.unkicked_prev = False
            self.kicks_prev = kicks
            return moved, None
        if not (self.unkicked_prev and kicks == self.kicks_prev):
            self.unkicked_prev = True   # give the driver one INTERVAL to kick
            self.kicks_prev = kicks
            return True, None
        self.unkicked_prev = False
        q.stats["unkicked"] += new
        return True, (known, n, new)

    async def _hand_over(self, now: float, found: tuple) -> None:
        """The unkicked entries a look found go to the device (a finding if
        the driver had to kick for them)."""
        known, n, new = found
        q = self.q
        suspect = self._must_notify(known, n, new)
        event_before = self._event()
        self.looked = self._looked(known, n, new)
        await self.drain(q)
        if suspect:
            self._confirm(force=True)
            # (time, avail position, detail, example, the device moved its event meanwhile)
            self.suspect = (now, n, *self._suspect(known, n, new, event_before), self._event() != event_before)

    # -- the ring format: split (avail->idx) -------------------------------------------
    # The packed subclass overrides these with descriptor flags and wrap counters.

    RULE = "kick_missed"

    def _avail_now(self):
        """What the driver has made available, as a value that changes when it makes more."""
        return self.q.avail_idx()

    def _new(self, known, n) -> int:
        """Entries past KNOWN the driver made available (0 if none, or a jump pop() names)."""
        new = (n - known) & 0xFFFF
        return 0 if new > self.q.num else new

    def _must_notify(self, known, n, new) -> bool:
        return self.q.must_notify(known, n)

    def _event(self):
        return self.q.avail_event()

    def _looked(self, known, n, new):
        return n

    def _suspect(self, known, n, new, event_before) -> tuple[str, dict]:
        q = self.q
        return (f"avail->idx moved from {known} to {n} with notifications enabled "
                f"and no kick for {INTERVAL * 1000:.0f} ms or more",
                {"avail_idx": n, "device_knew": known, "entries": new,
                 "event_idx": q.event_idx, "avail_event": event_before,
                 "expected": "a notification (kick)", "seen": "none"})

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
        self.q.count_error(self.RULE, s[2], **s[3])


class PackedSafetyPoll(SafetyPoll):
    """The safety poll of a packed ring: positions with wrap counters, descriptor flags (§2.8.1)."""

    RULE = "packed_kick_missed"

    def kicked(self) -> None:
        # A kick announces every descriptor available when it came. Split
        # rings read that off avail->idx; here it is the end of the available
        # run past what the device knows of, so an RX ring the device has no
        # frame for (nothing pops, nothing moves) is not taken for unkicked.
        before = self.kick_seen
        super().kicked()                # late-kick bookkeeping; its kick_seen is split's
        self.kick_seen = before
        q = self.q
        if q.mapped and q.ready:
            known = self._known()
            self.kick_seen = q.advance(*known, self._new(known, None))

    def _avail_now(self):
        # Whether the next descriptor the device would take is available, and
        # where that is: a driver making more available changes this.
        q = self.q
        pos = q.position()
        return (pos, q.available_at(*pos))

    def _known(self):
        """The furthest position the device knows of: (pos, wrap)."""
        q = self.q
        here = q.position()
        base = q.linear(*here)
        lap = 2 * q.num
        best, ahead = here, 0
        for p in (self.kick_seen, self.looked, q.avail_seen):
            if p is None:
                continue
            d = (q.linear(*p) - base) % lap
            if ahead < d <= q.num:
                best, ahead = p, d
        return best

    def _new(self, known, n) -> int:
        """Descriptors available from KNOWN on (a bounded scan, stopped at the first that is not)."""
        q = self.q
        pos, wrap = known
        count = 0
        while count < q.num and q.available_at(pos, wrap):
            count += 1
            pos, wrap = q.advance(pos, wrap, 1)
        return count

    def _must_notify(self, known, n, new) -> bool:
        """Whether our event suppression structure asked for a kick for those descriptors (§2.8.10)."""
        q = self.q
        ev = q.device_event()
        if ev is None:
            return False
        flags, off, wrap = ev
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags == RING_EVENT_FLAGS_DESC and q.event_idx:
            lap = 2 * q.num
            return (q.linear(off, wrap) - q.linear(*known)) % lap < new
        return flags == RING_EVENT_FLAGS_ENABLE

    def _event(self):
        return self.q.device_event()

    def _looked(self, known, n, new):
        return self.q.advance(*known, new)

    def _suspect(self, known, n, new, event_before) -> tuple[str, dict]:
        q = self.q
        return (f"{new} descriptor(s) made available from ring position {known[0]} (wrap counter "
                f"{int(known[1])}) with notifications enabled and no kick for {INTERVAL * 1000:.0f} ms or more",
                {"position": known[0], "wrap": int(known[1]), "entries": new, "event_idx": q.event_idx,
                 "device_event": None if event_before is None else
                 {"flags": event_before[0], "off": event_before[1], "wrap": int(event_before[2])},
                 "expected": "a notification (kick)", "seen": "none"})


def safety_poll_for(q, drain, clock=trio.current_time, hook=None) -> SafetyPoll:
    """The safety poll for ring Q's format; HOOK: the KickClock that runs its looks."""
    return (PackedSafetyPoll if q.packed else SafetyPoll)(q, drain, clock, hook)
