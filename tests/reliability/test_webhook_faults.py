"""Webhook faults: Brevo delivers 1,000 agent messages badly while 50 streams keep dropping.

The claim under test: 1,000 agent messages across 50 handoffs, delivered in fragments of 1
to 20 messages, with whole fragments delivered twice, fragments repeating messages of the
one before, messages shuffled inside a fragment, and neighbouring fragments delivered in the
wrong order; meanwhile each handoff's client drops its stream at random moments and resumes
from its last cursor. Every client receives every message exactly once, in ``createdAt``
order, then the end of the handoff (a transcript repeating the whole chat).

Across fragments, ``createdAt`` order needs the reorder window
(``--reorder-window-seconds``): without it a fragment delivered late goes to the streams
after the one delivered before it. The ``window-0`` variant shows exactly that: every
message still arrives exactly once, and some arrive out of ``createdAt`` order (the test
requires that some do, so that the schedule is known to reorder).

The schedule is seeded (``WEBHOOK_FAULTS_SEED``); figures go to build/reliability/.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from reliability_support import record_figures
from support import MARTA, Harness, close_harness, fixture, make_config, open_harness, until

from service.rpc.generated.handoff.v1 import handoff_pb2 as pb

SEED = int(os.environ.get("WEBHOOK_FAULTS_SEED", "20261125"))
HANDOFFS = 50
MESSAGES_PER_HANDOFF = 20  # 1,000 in all
MAX_BATCH = 20
DUPLICATE_RATE = 0.25  # a fragment delivered a second time, later
OVERLAP_RATE = 0.25  # a fragment that repeats 1-3 messages of the one before
SWAP_RATE = 0.3  # a fragment delivered before the one that precedes it
WINDOW_S = 3.0  # the reorder window: far longer than two back-to-back posts take
PACE_S = (0.0, 0.05)  # pause between two deliveries of one handoff
DROP_AFTER_S = (0.02, 0.4)  # a client drops its stream after this long
STEP_MS = 1000  # createdAt step between an agent's messages


@dataclass
class Delivery:
    body: dict[str, object]
    message_ids: list[str]
    answer: dict[str, object] | None = None


@dataclass
class Schedule:
    """One handoff's deliveries, in the order Brevo sends them."""

    deliveries: list[Delivery] = field(default_factory=list)
    duplicates: int = 0
    overlaps: int = 0
    swaps: int = 0
    largest_batch: int = 0


def message_body(template: dict[str, object], mid: str, created: int) -> dict[str, object]:
    return {**template, "id": mid, "text": f"text of {mid}", "createdAt": created}


def plan_deliveries(rng: random.Random, visitor_id: str, prefix: str) -> Schedule:
    base = fixture("fragment_minimal.json", visitor_id)
    template = base["messages"][0]  # type: ignore[index]
    assert isinstance(template, dict)
    start = int(template["createdAt"])
    messages = [
        message_body(template, f"{prefix}-m{i:02d}", start + i * STEP_MS)
        for i in range(MESSAGES_PER_HANDOFF)
    ]
    schedule = Schedule()
    fragments: list[list[dict[str, object]]] = []
    at = 0
    while at < len(messages):
        size = rng.randint(1, MAX_BATCH)
        batch = messages[at : at + size]
        if fragments and rng.random() < OVERLAP_RATE:
            repeat = fragments[-1][-rng.randint(1, 3) :]
            batch = repeat + batch
            schedule.overlaps += 1
        rng.shuffle(batch)  # inside a fragment: any order
        fragments.append(batch)
        at += size
    order = list(range(len(fragments)))
    i = 1
    while i < len(order):
        if rng.random() < SWAP_RATE:
            order[i - 1], order[i] = order[i], order[i - 1]
            schedule.swaps += 1
            i += 2
        else:
            i += 1
    sequence = [fragments[k] for k in order]
    for batch in list(sequence):
        if rng.random() < DUPLICATE_RATE:
            sequence.insert(rng.randint(sequence.index(batch) + 1, len(sequence)), batch)
            schedule.duplicates += 1
    for batch in sequence:
        body = {**base, "messages": [dict(m) for m in batch]}
        schedule.deliveries.append(Delivery(body, [str(m["id"]) for m in batch]))
        schedule.largest_batch = max(schedule.largest_batch, len(batch))
    return schedule


def describe(event: pb.HandoffEvent) -> str:
    kind = event.WhichOneof("payload")
    if kind == "agent_message":
        assert event.agent_message.agent.id == MARTA
        return event.agent_message.brevo_message_id
    return str(kind)


@dataclass
class Client:
    """A bot backend's stream of one handoff that drops and resumes from its cursor."""

    h: Harness
    handoff_id: str
    rng: random.Random
    received: list[tuple[str, str]] = field(default_factory=list)  # (cursor, what)
    resumes: int = 0

    async def run(self) -> None:
        # Until the client has seen the end: a drop may strike just as the end arrives, and
        # a client that saw it does not resume.
        while not self.received or self.received[-1][1] != "handoff_ended":
            cursor = self.received[-1][0] if self.received else ""
            call = self.h.stub.StreamAgentReplies(
                pb.StreamAgentRepliesRequest(handoff_id=self.handoff_id, after_cursor=cursor)
            )
            try:
                async with asyncio.timeout(self.rng.uniform(*DROP_AFTER_S)):
                    async for item in call:
                        if item.WhichOneof("item") == "event":
                            self.received.append((item.event.cursor, describe(item.event)))
                return  # the stream completed: the handoff ended
            except TimeoutError:
                self.resumes += 1  # the client drops the stream and resumes
            except grpc.aio.AioRpcError as exc:
                raise AssertionError(f"stream of {self.handoff_id} failed: {exc}") from exc
            finally:
                call.cancel()


@dataclass
class Variant:
    name: str
    store: str
    window_s: float


VARIANTS = [
    Variant("sqlite", "sqlite", WINDOW_S),
    Variant("redis", "redis", WINDOW_S),
    Variant("window-0", "sqlite", 0.0),
]


@pytest.fixture(params=VARIANTS, ids=[v.name for v in VARIANTS])
def variant(request: pytest.FixtureRequest) -> Variant:
    value: Variant = request.param
    return value


@pytest.fixture
async def h(
    tmp_path: Path, variant: Variant, request: pytest.FixtureRequest
) -> AsyncIterator[Harness]:
    flags: list[str] = ["--reorder-window-seconds", str(variant.window_s)]
    if variant.store == "redis":
        server = request.getfixturevalue("redis_server")
        flags += ["--redis-url", server.url, "--redis-key-prefix", "{webhook-faults}"]
    harness = await open_harness(make_config(tmp_path, *flags))
    try:
        yield harness
    finally:
        await close_harness(harness)


async def deliver_and_close(
    h: Harness, handoffs: list[pb.Handoff], schedules: list[Schedule], clients: list[Client]
) -> tuple[float, float]:
    """Posts every handoff's deliveries (the handoffs side by side); waits until every client
    holds all its messages; then closes every chat with a transcript that repeats them all.
    Returns how long the deliveries took, and until every message was on the streams."""

    async def deliver(schedule: Schedule, pace: random.Random) -> None:
        for delivery in schedule.deliveries:
            answer = await h.post(delivery.body)
            assert answer.status_code == 200, answer.text
            delivery.answer = answer.json()
            await asyncio.sleep(pace.uniform(*PACE_S))

    started = time.monotonic()
    await asyncio.gather(
        *(deliver(s, random.Random(f"{SEED}|pace|{n}")) for n, s in enumerate(schedules))
    )
    delivered_s = time.monotonic() - started
    # Every message reaches the streams (held ones once their window ends): joined + 20 each.
    await until(
        lambda: all(len(c.received) >= 1 + MESSAGES_PER_HANDOFF for c in clients),
        30,
        "every client received every message",
    )
    released_s = time.monotonic() - started
    for ho, schedule in zip(handoffs, schedules, strict=True):
        everything = sorted({m for d in schedule.deliveries for m in d.message_ids})
        transcript = fixture("fragment_minimal.json", ho.visitor_id)
        template = transcript["messages"][0]  # type: ignore[index]
        assert isinstance(template, dict)
        start = int(template["createdAt"])
        transcript["eventName"] = "conversationTranscript"
        transcript["messages"] = [
            message_body(template, mid, start + int(mid[-2:]) * STEP_MS) for mid in everything
        ]
        answer = await h.post(transcript)
        assert answer.json() == {"outcome": "stored", "events": 1}, answer.text
    return delivered_s, released_s


@pytest.mark.timeout(180)
async def test_every_client_gets_every_message_once_in_created_order(
    h: Harness,
    variant: Variant,
    request: pytest.FixtureRequest,
    record_property: Callable[[str, object], None],
) -> None:
    started = time.monotonic()
    rng = random.Random(SEED)
    handoffs = [await h.start_handoff(f"webhook-faults-{n}") for n in range(HANDOFFS)]
    schedules = [plan_deliveries(rng, ho.visitor_id, f"h{n:02d}") for n, ho in enumerate(handoffs)]
    clients = [Client(h, ho.id, random.Random(f"{SEED}|{ho.id}")) for ho in handoffs]
    readers = [asyncio.create_task(c.run()) for c in clients]
    try:
        delivered_s, released_s = await deliver_and_close(h, handoffs, schedules, clients)
        async with asyncio.timeout(60):
            await asyncio.gather(*readers)
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)

    out_of_order = 0
    for n, (client, schedule) in enumerate(zip(clients, schedules, strict=True)):
        whats = [what for _, what in client.received]
        cursors = [cursor for cursor, _ in client.received]
        expected = [f"h{n:02d}-m{i:02d}" for i in range(MESSAGES_PER_HANDOFF)]
        # Exactly once: no cursor twice, every message once, then the end.
        assert len(set(cursors)) == len(cursors), f"{client.handoff_id}: a repeated event"
        assert whats[0] == "agent_joined", whats
        assert whats[-1] == "handoff_ended", whats
        assert sorted(whats[1:-1]) == expected, whats
        if variant.window_s > 0:
            assert whats == ["agent_joined", *expected, "handoff_ended"], whats
        else:
            out_of_order += sum(1 for a, b in itertools.pairwise(whats[1:-1]) if a > b)
        outcomes = [d.answer.get("outcome") for d in schedule.deliveries if d.answer]
        assert set(outcomes) <= {"stored", "duplicate"}, outcomes
    if variant.window_s == 0:
        # The schedule does reorder: without the window, some messages overtake others.
        assert out_of_order > 0

    deliveries = [d for s in schedules for d in s.deliveries]
    figures: dict[str, object] = {
        "variant": variant.name,
        "store": variant.store,
        "reorder_window_s": variant.window_s,
        "handoffs": HANDOFFS,
        "agent_messages": HANDOFFS * MESSAGES_PER_HANDOFF,
        "deliveries": len(deliveries),
        "messages_delivered_incl_repeats": sum(len(d.message_ids) for d in deliveries),
        "duplicate_deliveries": sum(s.duplicates for s in schedules),
        "overlapping_fragments": sum(s.overlaps for s in schedules),
        "swapped_fragment_pairs": sum(s.swaps for s in schedules),
        "largest_batch": max(s.largest_batch for s in schedules),
        "answers_duplicate": sum(
            1 for d in deliveries if d.answer and d.answer["outcome"] == "duplicate"
        ),
        "stream_resumes": sum(c.resumes for c in clients),
        "events_received": sum(len(c.received) for c in clients),
        "messages_out_of_created_order": out_of_order,
        "delivery_s": round(delivered_s, 2),
        "all_messages_on_streams_after_s": round(released_s, 2),
        "duration_s": round(time.monotonic() - started, 2),
    }
    record_figures(request, record_property, figures)
