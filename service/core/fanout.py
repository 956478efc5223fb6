"""Live fan-out of committed events to the streams of this process, with bounded buffers."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence

from service.core.errors import HandoffError
from service.core.models import StoredEvent


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

    __slots__ = ("_items", "_limit", "_waiter", "error", "handoff_id", "overflowed")

    def __init__(self, handoff_id: str | None, limit: int) -> None:
        self.handoff_id = handoff_id
        self._limit = limit
        self._items: collections.deque[StoredEvent] | None = None
        self._waiter: asyncio.Future[None] | None = None
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

    async def next(self) -> StoredEvent | None:
        """The oldest buffered event, waiting for one; None once the subscription is broken
        and the buffer empty. Cancelling the wait loses nothing."""
        while True:
            event = self.take()
            if event is not None or self.broken:
                return event
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    def reset(self) -> None:
        """Forgets the buffer (the caller re-reads from the store instead)."""
        self._items = None
        self.overflowed = False
        self.error = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class EventHub:
    """Hands every committed event to the subscriptions that want it, without ever blocking.

    A full buffer does not slow the others down: that subscription is marked overflowed
    and receives nothing more until its owner resets or ends it.
    """

    def __init__(self, buffer_size: int) -> None:
        self._buffer_size = buffer_size
        self._by_handoff: dict[str, set[Subscription]] = {}
        self._everything: set[Subscription] = set()

    def subscribe(self, handoff_id: str | None) -> Subscription:
        sub = Subscription(handoff_id, self._buffer_size)
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
