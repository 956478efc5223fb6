"""Resumable streams: exactly the missed events after a cursor, across restarts too."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from pathlib import Path

from support import (
    Harness,
    agent_fragment,
    all_summaries,
    close_harness,
    fixture,
    make_config,
    open_harness,
)

from service.rpc.generated.handoff.v1 import handoff_pb2 as pb


async def agent_writes(h: Harness, visitor_id: str, *texts: str) -> None:
    for text in texts:
        await h.sandbox.agent_says(visitor_id, text)
    await h.settle()


def message_texts(events: list[pb.HandoffEvent]) -> list[str]:
    return [e.agent_message.text for e in events if e.WhichOneof("payload") == "agent_message"]


async def test_reconnect_with_last_cursor_gets_exactly_the_missed_events(
    harness: Harness,
) -> None:
    handoff = await harness.start_handoff()
    await agent_writes(harness, handoff.visitor_id, "one", "two")
    first = await harness.collect(handoff.id, 3)  # joined, one, two; then the client drops
    assert message_texts(first) == ["one", "two"]
    await agent_writes(harness, handoff.visitor_id, "three", "four")
    resumed = await harness.collect(handoff.id, 2, after_cursor=first[-1].cursor)
    assert message_texts(resumed) == ["three", "four"]
    # Resuming from the middle replays from there, nothing before.
    middle = await harness.collect(handoff.id, 3, after_cursor=first[1].cursor)
    assert message_texts(middle) == ["two", "three", "four"]


async def test_resume_goes_live_without_gap_or_duplicate(harness: Harness) -> None:
    handoff = await harness.start_handoff()
    await agent_writes(harness, handoff.visitor_id, "m0")
    (_, m0) = await harness.collect(handoff.id, 2)
    # Resume while the agent keeps writing: replay and live overlap; each message once.
    collector = asyncio.create_task(harness.collect(handoff.id, 20, after_cursor=m0.cursor))
    for i in range(1, 21):
        await harness.sandbox.agent_says(handoff.visitor_id, f"m{i}")
    events = await collector
    assert message_texts(events) == [f"m{i}" for i in range(1, 21)]


async def test_resume_across_a_restart_on_the_same_store(
    tmp_path: Path, store_flags: tuple[str, ...]
) -> None:
    config = make_config(tmp_path, *store_flags)
    h = await open_harness(config)
    handoff = await h.start_handoff()
    await agent_writes(h, handoff.visitor_id, "before restart")
    seen = await h.collect(handoff.id, 2)
    # While the client is away, two more replies arrive; then the service restarts.
    await agent_writes(h, handoff.visitor_id, "while away 1", "while away 2")
    await close_harness(h)

    h2 = await open_harness(config)
    try:
        resumed = await h2.collect(handoff.id, 2, after_cursor=seen[-1].cursor)
        assert message_texts(resumed) == ["while away 1", "while away 2"]
        # The restarted service still knows the handoff and its dedupe state.
        body = fixture("fragment_reply_with_echo.json", handoff.visitor_id)
        assert (await h2.post(body)).json()["events"] == 2  # new agent Marta + her reply
        assert (await h2.post(body)).json() == {"outcome": "duplicate", "events": 0}
        got = await h2.stub.GetHandoff(pb.GetHandoffRequest(handoff_id=handoff.id))
        assert got.handoff.state == pb.HANDOFF_STATE_ACTIVE
    finally:
        await close_harness(h2)


async def test_stream_of_every_handoff_resumes_too(harness: Harness) -> None:
    a = await harness.start_handoff("conv-a")
    b = await harness.start_handoff("conv-b")
    await harness.settle()
    live = asyncio.create_task(harness.collect("", 4))
    await asyncio.sleep(0.2)  # the deployment-wide stream starts "now"
    await agent_writes(harness, a.visitor_id, "to a")
    await agent_writes(harness, b.visitor_id, "to b")
    events = await live
    assert [(e.conversation_id, e.WhichOneof("payload")) for e in events] == [
        ("conv-a", "agent_joined"),
        ("conv-a", "agent_message"),
        ("conv-b", "agent_joined"),
        ("conv-b", "agent_message"),
    ]
    await agent_writes(harness, a.visitor_id, "later to a")
    resumed = await harness.collect("", 1, after_cursor=events[-1].cursor)
    assert message_texts(resumed) == ["later to a"]


async def test_ended_handoff_stream_replays_and_completes(harness: Harness) -> None:
    handoff = await harness.start_handoff()
    await agent_writes(harness, handoff.visitor_id, "hello")
    await harness.stub.StopHandoff(pb.StopHandoffRequest(handoff_id=handoff.id))
    call = harness.stub.StreamAgentReplies(pb.StreamAgentRepliesRequest(handoff_id=handoff.id))
    items = [item async for item in call]
    assert all_summaries([i.event for i in items]) == [
        ("joined", "SandboxAgentSam01", "Sam"),
        (
            "message",
            items[1].event.agent_message.brevo_message_id,
            "SandboxAgentSam01",
            "Sam",
            "hello",
        ),
        ("ended", "END_REASON_STOPPED_BY_BOT"),
    ]
    # A client that read the end but lost the stream before it completed resumes from the
    # end's cursor: the stream completes at once (within the heartbeat, 5 s), empty.
    resumed = harness.stub.StreamAgentReplies(
        pb.StreamAgentRepliesRequest(handoff_id=handoff.id, after_cursor=items[-1].event.cursor)
    )

    async def read_all() -> list[pb.StreamAgentRepliesResponse]:
        return [item async for item in resumed]

    assert await asyncio.wait_for(read_all(), 2) == []


async def test_a_stream_waiting_for_live_events_holds_none_of_what_it_replayed(
    harness: Harness,
) -> None:
    """Each stream decodes its replay for itself. Once it has sent it and waits for live
    events, none of it may stay referenced: a page held through the wait was up to
    replay_page events (500) for as long as the stream stayed open, on every stream that
    resumed; and each layer that forwards items (the core's stream, the servicer) held the
    last one. Python's allocations made during the replay are counted (tracemalloc), with
    the client's copies dropped: less than one of the replayed messages may remain."""
    handoff = await harness.start_handoff()
    texts = [f"{n:03d} " + "x" * 100_000 for n in range(30)]
    for n, text in enumerate(texts):
        body = agent_fragment(handoff.visitor_id, f"big-{n}", text, n)
        assert (await harness.post(body)).json()["outcome"] == "stored"
    call = harness.stub.StreamAgentReplies(pb.StreamAgentRepliesRequest(handoff_id=handoff.id))
    gc.collect()
    tracemalloc.start()
    try:
        received = 0
        async for item in call:
            if item.event.agent_message.text:
                assert item.event.agent_message.text[:4] == texts[received][:4]
                received += 1
                if received == len(texts):
                    break
        del item
        await asyncio.sleep(0.2)  # the stream sent its last item and waits for live events
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        call.cancel()
    replayed = sum(len(t) for t in texts)
    assert held < len(texts[0]), f"{held} bytes still held of a {replayed}-byte replay"
