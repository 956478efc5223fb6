"""Stream mechanics in the core: bounded buffers, overflow, replay past the buffer,
interrupted feeds and cursors beyond the log."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from service.core.errors import CursorExpired, HandoffError, StoreUnavailable, StreamOverflow
from service.core.fanout import HEARTBEAT_DUE, EventHub
from service.core.handoffs import HandoffManager, HandoffSettings, StartRequest
from service.core.inbound import ServiceIdentity
from service.core.models import (
    AgentMessage,
    Heartbeat,
    NoAgentAvailable,
    SentMessage,
    StoredEvent,
)
from service.core.ports import EventListener, InterruptListener, WantsHandoff
from service.storage.sqlite import SqliteStore


class RecordingBrevo:
    """The smallest Brevo for core tests: accepts every post."""

    def __init__(self) -> None:
        self.posts: list[tuple[str, str]] = []

    async def send_agent_message(self, visitor_id: str, text: str) -> SentMessage:
        self.posts.append((visitor_id, text))
        return SentMessage(id=f"sent-{len(self.posts)}", created_at_ms=0)

    async def check_account(self) -> str:
        return "recording"


def event(seq: int, handoff_id: str = "h") -> StoredEvent:
    return StoredEvent(seq, handoff_id, "c", 0, NoAgentAvailable())


def test_a_full_buffer_marks_only_that_subscription() -> None:
    hub = EventHub(buffer_size=2, heartbeat_s=60)
    slow, fast, other = hub.subscribe("h"), hub.subscribe("h"), hub.subscribe("x")
    for seq in (1, 2):
        hub.publish([event(seq)])
        assert fast.take() == event(seq)
    hub.publish([event(3)])
    assert (slow.overflowed, fast.overflowed, other.overflowed) == (True, False, False)
    assert (slow.buffered, fast.buffered, other.buffered) == (2, 1, 0)
    assert fast.take() == event(3)
    assert (fast.take(), other.take()) == (None, None)
    hub.unsubscribe(slow)
    hub.unsubscribe(fast)
    hub.unsubscribe(other)
    assert hub.subscriber_count == 0


async def test_a_waiting_reader_wakes_for_an_event_and_a_cancelled_wait_loses_nothing() -> None:
    hub = EventHub(buffer_size=5, heartbeat_s=60)
    sub = hub.subscribe("h")
    reader = asyncio.create_task(sub.next())
    await asyncio.sleep(0)
    assert not reader.done()
    hub.publish([event(1), event(2)])
    assert await asyncio.wait_for(reader, 5) == event(1)
    assert await sub.next() == event(2)
    # A wait that times out (as a stream's heartbeat wait does) takes nothing with it, nor
    # does one cancelled in the very turn an event woke it.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(sub.next(), 0.01)
    reader = asyncio.create_task(sub.next())
    await asyncio.sleep(0)
    hub.publish([event(3)])
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert (sub.buffered, await sub.next(), sub.buffered) == (1, event(3), 0)


async def test_a_broken_subscription_gives_what_it_holds_then_none() -> None:
    hub = EventHub(buffer_size=1, heartbeat_s=60)
    full, waiting = hub.subscribe("h"), hub.subscribe("x")
    hub.publish([event(1), event(2)])
    assert full.overflowed
    assert (await full.next(), await full.next()) == (event(1), None)
    reader = asyncio.create_task(waiting.next())
    await asyncio.sleep(0)
    problem = StoreUnavailable("the feed broke")
    hub.interrupt(problem)
    assert await asyncio.wait_for(reader, 5) is None
    assert (waiting.error, full.error) == (problem, None)  # the overflowed one was told already
    full.reset()
    hub.publish([event(3)])
    assert (full.broken, await full.next()) == (False, event(3))


async def test_a_waiting_reader_hears_of_a_heartbeat_within_the_interval_never_early() -> None:
    hub = EventHub(buffer_size=5, heartbeat_s=0.08)  # a sweep every 10 ms
    readers = [hub.subscribe("h") for _ in range(50)]
    loop = asyncio.get_running_loop()
    started = loop.time()
    woken = await asyncio.gather(*(asyncio.wait_for(r.next(), 5) for r in readers))
    waited = loop.time() - started
    assert woken == [HEARTBEAT_DUE] * 50
    # 7/8 of the interval at least, by the loop's clock the sweep reads; the upper bound
    # only catches a sweep that never comes (a loaded machine runs timers late).
    assert 0.07 <= waited < 1.0
    # An event resets the wait: a reader that just took one waits the whole 7/8 again.
    one = readers[0]
    reader = asyncio.create_task(one.next())
    await asyncio.sleep(0.05)
    hub.publish([event(1)])
    assert await reader == event(1)
    restarted = loop.time()
    assert await asyncio.wait_for(one.next(), 5) is HEARTBEAT_DUE
    assert loop.time() - restarted >= 0.07


async def test_the_sweep_stops_when_no_reader_waits_and_a_busy_reader_is_not_woken() -> None:
    hub = EventHub(buffer_size=5, heartbeat_s=0.08)
    waiting, busy = hub.subscribe("h"), hub.subscribe("h")
    reader = asyncio.create_task(waiting.next())
    await asyncio.sleep(0.2)  # several sweeps; ``busy`` never waits in them
    assert await reader is HEARTBEAT_DUE
    hub.publish([event(1)])
    # The busy reader's next call gives its event, not a heartbeat it never waited for.
    assert await busy.next() == event(1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await asyncio.wait_for(busy.next(), 5) is HEARTBEAT_DUE
    assert loop.time() - started >= 0.07  # its own wait, whole
    assert await waiting.next() == event(1)
    cancelled = asyncio.create_task(waiting.next())
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    await asyncio.sleep(0.05)  # the sweep finds nobody waiting and is not armed again
    assert (hub._waiting, hub._sweep_timer) == (set(), None)


def test_a_heartbeat_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="heartbeat_s must be positive"):
        EventHub(buffer_size=1, heartbeat_s=0)


def test_the_hub_wants_the_handoffs_it_has_subscriptions_for() -> None:
    """What a shared store's feed asks before decoding an event for this process."""
    hub = EventHub(buffer_size=2, heartbeat_s=60)
    assert (hub.wants("h"), hub.wants("x")) == (False, False)
    one = hub.subscribe("h")
    assert (hub.wants("h"), hub.wants("x")) == (True, False)
    everything = hub.subscribe(None)
    assert (hub.wants("h"), hub.wants("x")) == (True, True)
    hub.unsubscribe(everything)
    hub.unsubscribe(one)
    assert (hub.wants("h"), hub.wants("x")) == (False, False)


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[HandoffManager]:
    store = await SqliteStore.open(str(tmp_path / "s.db"))
    yield HandoffManager(
        store,
        RecordingBrevo(),
        HandoffSettings(
            identity=ServiceIdentity("Me", "handoff-service"),
            stream_buffer=5,
            replay_page=3,
            heartbeat_s=0.05,
        ),
    )
    await store.close()


async def agent_messages(
    manager: HandoffManager, visitor_id: str, count: int, start: int = 0
) -> None:
    for i in range(start, start + count):
        await manager.handle_webhook(
            {
                "eventName": "conversationFragment",
                "visitor": {"id": visitor_id},
                "messages": [
                    {"id": f"m{i}", "type": "agent", "agentId": "A", "createdAt": i, "text": str(i)}
                ],
            }
        )


async def next_event(stream: AsyncIterator[StoredEvent | Heartbeat]) -> StoredEvent:
    while True:
        item = await asyncio.wait_for(anext(stream), 5)
        if isinstance(item, StoredEvent):
            return item


async def test_a_reader_that_stops_reading_is_cut_off_and_can_resume(
    manager: HandoffManager,
) -> None:
    handoff, _ = await manager.start(StartRequest("c"))
    stream = await manager.events(handoff.id, "")
    await agent_messages(manager, handoff.visitor_id, 1)
    last = await next_event(stream)  # AgentJoined
    last = await next_event(stream)  # message 0
    # A heartbeat: the replay is over and the stream is live.
    assert isinstance(await asyncio.wait_for(anext(stream), 5), Heartbeat)
    await agent_messages(manager, handoff.visitor_id, 10, start=1)  # more than the buffer of 5
    # The buffered events are not delivered: the stream ends at once, and the reader
    # resumes from the last cursor it received.
    with pytest.raises(StreamOverflow, match="reconnect with after_cursor"):
        await asyncio.wait_for(anext(stream), 5)
    resumed = await manager.events(handoff.id, last.cursor)
    texts: list[str] = []
    while len(texts) < 10:
        item = await next_event(resumed)
        assert isinstance(item.payload, AgentMessage)
        texts.append(item.payload.text)
    assert texts == [str(i) for i in range(1, 11)]
    assert manager.open_streams == 1  # the overflowed one was released
    await resumed.aclose()  # type: ignore[attr-defined]
    assert manager.open_streams == 0


async def test_replay_longer_than_the_buffer_and_pages_is_complete(
    manager: HandoffManager,
) -> None:
    handoff, _ = await manager.start(StartRequest("c"))
    await agent_messages(manager, handoff.visitor_id, 12)
    stream = await manager.events(handoff.id, "")
    first = await next_event(stream)
    # While replay is in progress, more arrive than the live buffer holds.
    await agent_messages(manager, handoff.visitor_id, 8, start=12)
    texts: list[str] = []
    while len(texts) < 20:
        item = await next_event(stream)
        assert isinstance(item.payload, AgentMessage)
        texts.append(item.payload.text)
    assert type(first.payload).__name__ == "AgentJoined"
    assert texts == [str(i) for i in range(20)]


class InterruptibleStore(SqliteStore):
    """SQLite, with a handle on the interruption a shared backend's feed would signal."""

    interrupt: InterruptListener | None = None

    def set_listener(
        self,
        listener: EventListener,
        on_interrupt: InterruptListener,
        wants: WantsHandoff | None = None,
    ) -> None:
        super().set_listener(listener, on_interrupt, wants)
        self.interrupt = on_interrupt


async def test_an_interrupted_feed_ends_live_streams_at_once_and_they_resume(
    tmp_path: Path,
) -> None:
    store = await InterruptibleStore.open(str(tmp_path / "s.db"))
    settings = HandoffSettings(identity=ServiceIdentity("Me", "svc"), heartbeat_s=60)
    manager = HandoffManager(store, RecordingBrevo(), settings)
    try:
        handoff, _ = await manager.start(StartRequest("c"))
        await agent_messages(manager, handoff.visitor_id, 1)
        one, everything = await manager.events(handoff.id, ""), await manager.events("", "")
        await next_event(one)
        last = await next_event(one)
        waiting = [asyncio.ensure_future(anext(s)) for s in (one, everything)]
        await asyncio.sleep(0.05)  # both are live, waiting on empty buffers
        assert not any(w.done() for w in waiting)
        assert store.interrupt is not None
        store.interrupt(StoreUnavailable("lost the feed; reconnect with after_cursor"))
        for waiter in waiting:  # long before the 60 s heartbeat
            with pytest.raises(StoreUnavailable, match="reconnect with after_cursor"):
                await asyncio.wait_for(waiter, 2)
        assert manager.open_streams == 0
        await agent_messages(manager, handoff.visitor_id, 1, start=1)
        resumed = await manager.events(handoff.id, last.cursor)
        again = await next_event(resumed)
        assert isinstance(again.payload, AgentMessage)
        assert again.payload.text == "1"
        await resumed.aclose()  # type: ignore[attr-defined]
    finally:
        await store.close()


async def test_a_cursor_beyond_the_newest_event_is_refused(manager: HandoffManager) -> None:
    handoff, _ = await manager.start(StartRequest("c"))
    await agent_messages(manager, handoff.visitor_id, 1)
    replay = await manager.events(handoff.id, "")
    await next_event(replay)
    newest = await next_event(replay)
    await replay.aclose()  # type: ignore[attr-defined]
    beyond = f"c1.{newest.seq + 1}"
    for handoff_id in (handoff.id, ""):
        with pytest.raises(CursorExpired, match="reconnect without after_cursor") as caught:
            await manager.events(handoff_id, beyond)
        assert isinstance(caught.value, HandoffError)
    # The newest cursor itself is fine: nothing to replay, the stream is live at once.
    live = await manager.events(handoff.id, newest.cursor)
    assert isinstance(await asyncio.wait_for(anext(live), 5), Heartbeat)
    await live.aclose()  # type: ignore[attr-defined]
