"""Live fan-out of committed events to the streams of this process, with bounded buffers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from service.core.errors import HandoffError
from service.core.models import StoredEvent


@dataclass(eq=False)
class Subscription:
    """One stream's buffer.

    ``overflowed`` turns true when the reader fell behind the bound; ``error`` is set when
    live delivery to this process was interrupted (the store's event feed broke). Either
    way the buffer can no longer be trusted to hold every event. A ``None`` in the queue
    only wakes the reader up to look at ``error``.
    """

    handoff_id: str | None
    queue: asyncio.Queue[StoredEvent | None] = field(default_factory=asyncio.Queue)
    overflowed: bool = False
    error: HandoffError | None = None

    @property
    def broken(self) -> bool:
        return self.overflowed or self.error is not None

    def reset(self) -> None:
        """Forgets the buffer (the caller re-reads from the store instead)."""
        while not self.queue.empty():
            self.queue.get_nowait()
        self.overflowed = False
        self.error = None


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
        sub = Subscription(handoff_id, asyncio.Queue(maxsize=self._buffer_size))
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
                if sub.broken:
                    continue
                try:
                    sub.queue.put_nowait(event)
                except asyncio.QueueFull:
                    sub.overflowed = True

    def interrupt(self, error: HandoffError) -> None:
        """Live delivery stopped: every current subscription learns ``error`` at once."""
        subs = [*self._everything, *(s for group in self._by_handoff.values() for s in group)]
        for sub in subs:
            if sub.broken:
                continue
            sub.error = error
            # The None wakes a reader waiting on an empty queue; a full one wakes it anyway.
            with contextlib.suppress(asyncio.QueueFull):
                sub.queue.put_nowait(None)
