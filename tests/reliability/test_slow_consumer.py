"""A client that stops reading holds neither the service's memory nor the other readers.

One stream opens, reads one item and then reads nothing more: a client in a process of its
own (silent_client.py), so that what its connection absorbs is not counted as the
service's memory. 20 other streams on the same handoff read normally, while webhooks keep
bringing agent messages of 8 KiB, five to a fragment. gRPC's flow control first lets the
silent client's connection absorb what its windows allow (a few MiB: the windows grow with
the measured bandwidth); then the service's writer for that stream blocks, the stream's
buffer in the service (``--stream-buffer 50``) fills, and the service gives up on that
stream: it buffers nothing more for it. The producer goes on until that has happened, then
sends 500 messages more.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from client_process import ClientProcess
from reliability_support import record_figures, rss_bytes
from support import Harness, close_harness, fixture, make_config, open_harness

from service.core.fanout import Subscription
from service.rpc.generated.handoff.v1 import handoff_pb2 as pb

BUFFER = 50  # --stream-buffer: events buffered per stream before a slow reader is cut off
READERS = 20  # streams that read normally
MESSAGE_BYTES = 8 * 1024  # large messages fill the flow-control windows with fewer events
BATCH = 5  # agent messages per webhook
MAX_MESSAGES = 3000  # the test fails if the cut-off has not come by then
AFTER_CUT_OFF = 500  # messages sent after the cut-off
MAX_LAG = 25  # events a normal reader may be behind before the producer waits for it
RSS_BOUND = 50 * 1024 * 1024  # what the whole run may add to the service's process
SILENT_CLIENT = Path(__file__).with_name("silent_client.py")


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = await open_harness(
        make_config(tmp_path, "--stream-buffer", str(BUFFER), "--heartbeat-seconds", "1")
    )
    try:
        yield harness
    finally:
        await close_harness(harness)


def subscriptions(h: Harness) -> list[Subscription]:
    """The service's live stream buffers. No public API counts what they hold
    (``HandoffManager.open_streams`` counts streams only), so this reads the private hub."""
    hub = h.running.manager._hub
    return [*hub._everything, *(s for group in hub._by_handoff.values() for s in group)]


def fragment(visitor_id: str, first: int, count: int) -> dict[str, object]:
    """A conversationFragment with agent messages ``first`` .. ``first + count - 1``."""
    body = fixture("fragment_minimal.json", visitor_id)
    template = body["messages"]
    assert isinstance(template, list)
    messages = []
    for n in range(first, first + count):
        message = dict(template[0])
        head = f"message {n}: "
        message.update(
            id=f"m{n}",
            text=head + "x" * (MESSAGE_BYTES - len(head)),
            createdAt=int(message["createdAt"]) + n,
        )
        messages.append(message)
    body["messages"] = messages
    return body


def describe(event: pb.HandoffEvent) -> str:
    kind = event.WhichOneof("payload")
    if kind == "agent_message":
        return event.agent_message.brevo_message_id
    return str(kind)


@dataclass
class Reader:
    """Reads a stream to its end, keeping (cursor, what) of each event."""

    call: grpc.aio.UnaryStreamCall[pb.StreamAgentRepliesRequest, pb.StreamAgentRepliesResponse]
    events: list[tuple[str, str]] = field(default_factory=list)
    error: grpc.aio.AioRpcError | None = None

    async def run(self) -> None:
        try:
            async for item in self.call:
                if item.WhichOneof("item") == "event":
                    self.events.append((item.event.cursor, describe(item.event)))
        except grpc.aio.AioRpcError as exc:
            self.error = exc


async def test_a_reader_that_stops_reading_is_cut_off_and_nobody_else_notices(
    h: Harness,
    request: pytest.FixtureRequest,
    record_property: Callable[[str, object], None],
) -> None:
    """The silent stream ends RESOURCE_EXHAUSTED ("reconnect with after_cursor") once it
    reads again, and resuming from its last cursor gives it every event exactly once; the
    20 other streams receive every event in order, none missing and none twice; the
    service's buffer for the silent stream never exceeds 50 events, and the process that
    runs the service (and the 20 normal readers) grows by less than 50 MiB over the run."""
    started = time.monotonic()
    handoff = await h.start_handoff("slow-consumer")
    first = await h.post(fragment(handoff.visitor_id, 0, 1))
    assert first.json() == {"outcome": "stored", "events": 2}
    request_all = pb.StreamAgentRepliesRequest(handoff_id=handoff.id)

    silent = await ClientProcess.start(SILENT_CLIENT, h.running.grpc_target, handoff.id)
    try:
        head = (await silent.answer(30))["first"]
        assert head[1] == "agent_joined"
        readers = [Reader(h.stub.StreamAgentReplies(request_all)) for _ in range(READERS)]
        tasks = [asyncio.create_task(r.run()) for r in readers]
        expected = ["agent_joined", "m0"]

        async def caught_up(behind: int) -> None:
            async with asyncio.timeout(20):
                while min(len(r.events) for r in readers) < len(expected) - behind:  # noqa: ASYNC110 (no event to wait on)
                    await asyncio.sleep(0.002)

        await caught_up(0)
        assert h.running.manager.open_streams == READERS + 1
        rss_before = rss_bytes()
        produced_at = time.monotonic()
        sent = 1
        cut_off_after: int | None = None
        cut_off_s = 0.0
        rss_at_cut_off = 0
        most_buffered = 0
        worst_lag = 0
        while sent < MAX_MESSAGES and (
            cut_off_after is None or sent < cut_off_after + AFTER_CUT_OFF
        ):
            answer = await h.post(fragment(handoff.visitor_id, sent, BATCH))
            assert answer.json() == {"outcome": "stored", "events": BATCH}
            expected += [f"m{n}" for n in range(sent, sent + BATCH)]
            sent += BATCH
            subs = subscriptions(h)
            most_buffered = max(most_buffered, max(s.buffered for s in subs))
            overflowed = [s for s in subs if s.overflowed]
            assert len(overflowed) <= 1, "a normal reader was cut off"
            if overflowed and cut_off_after is None:
                cut_off_after = sent
                cut_off_s = time.monotonic() - produced_at
                rss_at_cut_off = rss_bytes()
            worst_lag = max(worst_lag, len(expected) - min(len(r.events) for r in readers))
            await caught_up(MAX_LAG)
        assert cut_off_after is not None, f"no cut-off after {sent} messages"
        production_s = time.monotonic() - produced_at
        rss_end_of_production = rss_bytes()
        silent_buffer = max(s.buffered for s in subscriptions(h))

        await h.stub.StopHandoff(pb.StopHandoffRequest(handoff_id=handoff.id))
        expected.append("handoff_ended")
        async with asyncio.timeout(30):
            await asyncio.gather(*tasks)
        rss_after = rss_bytes()

        # Every normal reader: every event, in order, none twice, nothing missing.
        for reader in readers:
            assert reader.error is None, reader.error
            assert [what for _, what in reader.events] == expected
        everything = readers[0].events
        assert len({cursor for cursor, _ in everything}) == len(everything)

        # The silent client reads again: what its connection held, then the cut-off.
        await silent.say("read")
        cut = await silent.answer(60)
        assert cut["code"] == "RESOURCE_EXHAUSTED", cut["code"]
        assert "reconnect with after_cursor" in cut["details"]
        held = [(head[0], head[1]), *((c, w) for c, w in cut["held"])]
        assert held == everything[: len(held)]
    finally:
        await silent.close()

    # It resumes from its last cursor and gets the rest, each event once.
    resumed = Reader(
        h.stub.StreamAgentReplies(
            pb.StreamAgentRepliesRequest(handoff_id=handoff.id, after_cursor=held[-1][0])
        )
    )
    async with asyncio.timeout(30):
        await resumed.run()
    assert resumed.error is None, resumed.error
    assert held + resumed.events == everything
    assert h.running.manager.open_streams == 0
    assert silent_buffer <= BUFFER
    growth = rss_after - rss_before
    figures: dict[str, object] = {
        "readers": READERS,
        "stream_buffer": BUFFER,
        "message_bytes": MESSAGE_BYTES,
        "agent_messages_sent": sent,
        "events_per_stream": len(expected),
        "cut_off_after_messages": cut_off_after,
        "cut_off_after_s": round(cut_off_s, 3),
        "silent_stream_received_before_cut_off": len(held),
        "silent_stream_resumed_events": len(resumed.events),
        "silent_client_rss_mib": cut["rss_mib"],
        "service_buffer_of_silent_stream_at_end": silent_buffer,
        "service_buffer_max_of_any_stream": most_buffered,
        "normal_reader_max_lag_events": worst_lag,
        "production_s": round(production_s, 2),
        "rss_before_mib": round(rss_before / 2**20, 1),
        "rss_at_cut_off_mib": round(rss_at_cut_off / 2**20, 1),
        "rss_end_of_production_mib": round(rss_end_of_production / 2**20, 1),
        "rss_after_mib": round(rss_after / 2**20, 1),
        "rss_growth_mib": round(growth / 2**20, 1),
        "rss_bound_mib": RSS_BOUND // 2**20,
        "duration_s": round(time.monotonic() - started, 2),
    }
    record_figures(request, record_property, figures)
    assert growth < RSS_BOUND, figures
