"""Live fan-out of committed events to the streams of this process, with bounded buffers."""

from __future__ import annotations

import asyncio
import collections
import enum
from collections.abc import Sequence

from service.core.errors import HandoffError
from service.core.models import StoredEvent


class Idle(enum.Enum):
    """What ``Subscription.next`` returns when its reader has waited long enough for a
    heartbeat (see EventHub)."""

    HEARTBEAT_DUE = "heartbeat due"


HEARTBEAT_DUE = Idle.HEARTBEAT_DUE


class Subscription:
    """One stream's buffer, bounded: ``limit`` events at most.

    ``overflowed`` turns true when the reader fell behind the bound; ``error`` is set when
    live delivery to this process was interrupted (the store's event feed broke). Either
    way the buffer can no longer be trusted to hold every event, and ``next`` returns
    None once what it holds has been read.

    Not an ``asyncio.Queue``: that is four deques of 760 bytes each, empty (its getters,
    putters, items and an Event's waiters) for every open stream, most of them idle. Here
    the items' deque exists only while it holds something, and a reader waits on a future
    of its own.
    """

    __slots__ = (
        "_beat",
        "_hub",
        "_items",
        "_limit",
        "_waiter",
        "error",
        "handoff_id",
        "idle_since",
        "overflowed",
    )

    def __init__(self, handoff_id: str | None, limit: int, hub: EventHub) -> None:
        self.handoff_id = handoff_id
        self._limit = limit
        self._hub = hub
        self._items: collections.deque[StoredEvent] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.idle_since = 0.0  # the event loop's time when the waiting reader began to wait
        self._beat = False
        self.overflowed = False
        self.error: HandoffError | None = None

    @property
    def broken(self) -> bool:
        return self.overflowed or self.error is not None

    @property
    def buffered(self) -> int:
        """How many events the buffer holds."""
        return len(self._items) if self._items is not None else 0

    def put(self, event: StoredEvent) -> None:
        """Buffers ``event`` for the reader, or marks the subscription overflowed when the
        buffer holds ``limit`` already."""
        items = self._items
        if items is None:
            items = self._items = collections.deque()
        if len(items) >= self._limit:
            self.overflowed = True
        else:
            items.append(event)
        self._wake()

    def interrupt(self, error: HandoffError) -> None:
        self.error = error
        self._wake()

    def take(self) -> StoredEvent | None:
        """The oldest buffered event, without waiting; None when there is none."""
        items = self._items
        if not items:
            return None
        event = items.popleft()
        if not items:
            self._items = None  # an idle stream holds no deque
        return event

    async def next(self) -> StoredEvent | Idle | None:
        """The oldest buffered event, waiting for one; HEARTBEAT_DUE once it has waited
        about the hub's heartbeat interval; None once the subscription is broken and the
        buffer empty. Cancelling the wait loses nothing."""
        while True:
            event = self.take()
            if event is not None or self.broken:
                self._beat = False
                return event
            if self._beat:
                self._beat = False
                return HEARTBEAT_DUE
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            self.idle_since = loop.time()
            self._hub._waiting_begins(self)
            try:
                await waiter
            finally:
                self._waiter = None
                self._hub._waiting_ends(self)

    def beat_if_idle_since(self, before: float) -> None:
        """Wakes the reader for a heartbeat if it has waited since ``before`` or earlier."""
        if self._waiter is not None and self.idle_since <= before:
            self._beat = True
            self._wake()

    def reset(self) -> None:
        """Forgets the buffer (the caller re-reads from the store instead)."""
        self._items = None
        self.overflowed = False
        self.error = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


# A sweep every eighth of the heartbeat interval: a reader waiting for an event is woken
# for a heartbeat after between 7/8 of the interval and the whole of it.
SWEEPS_PER_HEARTBEAT = 8


class EventHub:
    """Hands every committed event to the subscriptions that want it, without ever blocking.

    A full buffer does not slow the others down: that subscription is marked overflowed
    and receives nothing more until its owner resets or ends it.

    Heartbeats: one timer for the whole hub, not one per waiting reader. A timer per wait
    (``asyncio.timeout`` around each) was a TimerHandle and a Timeout made, pushed onto the
    event loop's heap and cancelled for every event of every stream, and both kept for
    every idle one. Here, while readers wait, a sweep every ``heartbeat_s / 8`` wakes
    those that have waited ``heartbeat_s * 7/8`` or longer with HEARTBEAT_DUE, so that an
    idle stream hears something within every ``heartbeat_s``.
    """

    def __init__(self, buffer_size: int, heartbeat_s: float) -> None:
        if heartbeat_s <= 0:
            raise ValueError("heartbeat_s must be positive")
        self._buffer_size = buffer_size
        self._by_handoff: dict[str, set[Subscription]] = {}
        self._everything: set[Subscription] = set()
        self._sweep_s = heartbeat_s / SWEEPS_PER_HEARTBEAT
        self._idle_s = heartbeat_s - self._sweep_s
        self._waiting: set[Subscription] = set()
        self._sweep_timer: asyncio.TimerHandle | None = None

    def subscribe(self, handoff_id: str | None) -> Subscription:
        sub = Subscription(handoff_id, self._buffer_size, self)
        if handoff_id is None:
            self._everything.add(sub)
        else:
            self._by_handoff.setdefault(handoff_id, set()).add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if sub.handoff_id is None:
            self._everything.discard(sub)
            return
        subs = self._by_handoff.get(sub.handoff_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._by_handoff[sub.handoff_id]

    def wants(self, handoff_id: str) -> bool:
        """Whether any subscription here would take an event of ``handoff_id``."""
        return bool(self._everything) or handoff_id in self._by_handoff

    @property
    def subscriber_count(self) -> int:
        return len(self._everything) + sum(len(s) for s in self._by_handoff.values())

    def publish(self, events: Sequence[StoredEvent]) -> None:
        for event in events:
            for sub in (*self._everything, *self._by_handoff.get(event.handoff_id, ())):
                if not sub.broken:
                    sub.put(event)

    def interrupt(self, error: HandoffError) -> None:
        """Live delivery stopped: every current subscription learns ``error`` at once."""
        subs = [*self._everything, *(s for group in self._by_handoff.values() for s in group)]
        for sub in subs:
            if not sub.broken:
                sub.interrupt(error)

    # --- heartbeats ---------------------------------------------------------------------

    def _waiting_begins(self, sub: Subscription) -> None:
        self._waiting.add(sub)
        if self._sweep_timer is None:
            loop = asyncio.get_running_loop()
            self._sweep_timer = loop.call_later(self._sweep_s, self._sweep)

    def _waiting_ends(self, sub: Subscription) -> None:
        self._waiting.discard(sub)

    def _sweep(self) -> None:
        self._sweep_timer = None
        if not self._waiting:
            return  # the next wait arms the sweep again
        loop = asyncio.get_running_loop()
        before = loop.time() - self._idle_s
        for sub in list(self._waiting):
            sub.beat_if_idle_since(before)
        self._sweep_timer = loop.call_later(self._sweep_s, self._sweep)
