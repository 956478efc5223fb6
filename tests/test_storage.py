"""The HandoffStore contract. Every backend must pass the same assertions (parametrised)."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
from redis_server import RedisServer
from support import sample_handoff, until

from service.core.codec import payload_to_json
from service.core.errors import ConcurrentUpdate, HandoffError, StoreUnavailable
from service.core.models import (
    Agent,
    AgentMessage,
    Commit,
    EndReason,
    EventPayload,
    Handoff,
    HandoffEnded,
    HandoffState,
    HeldMessage,
    NewEvent,
    NoAgentAvailable,
    StoredEvent,
)
from service.core.ports import HandoffStore
from service.storage import sqlite as sqlite_module
from service.storage.redis_store import RedisSettings, RedisStore
from service.storage.sqlite import SqliteStore

Opener = Callable[[], Awaitable[HandoffStore]]


def id_statements(statements: list[str]) -> tuple[int, int, int]:
    """The SQLite store's statements about message ids, by kind: whole loads of a handoff's
    ids (LIMIT), lookups of a webhook's own ids in all three places (an uncached handoff),
    and confirmations of ids whose fingerprints matched (in one place each)."""
    loads = lookups = confirmations = 0
    for s in statements:
        seen, sent = "FROM seen_messages" in s, "FROM sent_messages" in s
        if seen and "LIMIT" in s:
            loads += 1
        elif seen and sent and "IN (" in s:
            lookups += 1
        elif (seen or sent) and "IN (" in s:
            confirmations += 1
    return loads, lookups, confirmations


async def known(store: HandoffStore, handoff_id: str, ids: list[str]) -> tuple[set[str], set[str]]:
    """Which of ``ids`` the handoff has seen, and which it sent (it must exist)."""
    handoff, seen, sent = await store.read_for_webhook(handoff_id, ids)
    assert handoff is not None
    return seen, sent


@pytest.fixture(params=["sqlite", "sqlite-full", "redis"])
async def opener(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens the backend on the same durable location each time it is called.

    SQLite runs its statements on the event loop in NORMAL mode and on its thread in FULL
    mode: both are tested. For Redis the location is one key prefix on the session's
    redis-server, new for each test.
    """
    opened: list[HandoffStore] = []
    prefix = f"{{t{secrets.token_hex(6)}}}"

    async def open_store() -> HandoffStore:
        store: HandoffStore
        if request.param == "sqlite":
            store = await SqliteStore.open(str(tmp_path / "store.db"))
        elif request.param == "sqlite-full":
            store = await SqliteStore.open(str(tmp_path / "store.db"), "FULL")
        else:
            server: RedisServer = request.getfixturevalue("redis_server")
            store = await RedisStore.open(RedisSettings(server.url, prefix=prefix))
        opened.append(store)
        return store

    yield open_store
    for store in opened:
        await store.close()


async def test_create_is_unique_per_open_conversation(opener: Opener) -> None:
    store = await opener()
    first, created = await store.create_handoff(sample_handoff(1, "same"))
    assert created
    again, created_again = await store.create_handoff(sample_handoff(2, "same"))
    assert (again.id, created_again) == ("ho_1", False)
    assert await store.find_open_by_conversation("same") == first
    ended = dataclasses.replace(first, state=HandoffState.ENDED, end_reason=EndReason.TIMED_OUT)
    await store.commit(Commit(ended, expected_version=0))
    assert await store.find_open_by_conversation("same") is None
    fresh, created_fresh = await store.create_handoff(sample_handoff(3, "same"))
    assert (fresh.id, created_fresh) == ("ho_3", True)


async def test_lookups(opener: Opener) -> None:
    store = await opener()
    h, _ = await store.create_handoff(sample_handoff(1))
    assert await store.get_handoff("ho_1") == h
    assert await store.get_handoff("nope") is None
    assert await store.find_by_visitor("hf_1") == h
    named = dataclasses.replace(h, brevo_conversation_id="B1")
    await store.commit(Commit(named, 0))
    found = await store.find_by_brevo_conversation("B1")
    assert found is not None
    assert (found.id, found.version) == ("ho_1", 1)


async def test_what_a_webhook_reads(opener: Opener) -> None:
    """Routing by visitor, then the record with the message ids already handled and sent."""
    store = await opener()
    assert await store.handoff_id_of_visitor("hf_1") is None
    h, _ = await store.create_handoff(sample_handoff(1))
    assert await store.handoff_id_of_visitor("hf_1") == "ho_1"
    assert await store.read_for_webhook("ho_1", ["m1", "s1"]) == (h, set(), set())
    active = dataclasses.replace(h, state=HandoffState.ACTIVE)
    await store.commit(
        Commit(
            active,
            0,
            events=(NewEvent(5, AgentMessage("m1", Agent("A"), "one")),),
            seen_message_ids=("m1",),
            sent_message_ids=("s1",),
        )
    )
    assert await store.read_for_webhook("ho_1", ["m1", "m2", "s1", "m1"]) == (
        dataclasses.replace(active, version=1),
        {"m1"},
        {"s1"},
    )
    assert await store.read_for_webhook("ho_1", []) == (
        dataclasses.replace(active, version=1),
        set(),
        set(),
    )
    assert await store.read_for_webhook("nope", ["m1"]) == (None, set(), set())
    # Another process (a fresh store on the same data) finds the same.
    await store.close()
    reopened = await opener()
    assert await reopened.handoff_id_of_visitor("hf_1") == "ho_1"
    assert await reopened.read_for_webhook("ho_1", ["m1", "s1"]) == (
        dataclasses.replace(active, version=1),
        {"m1"},
        {"s1"},
    )
    # A webhook with thousands of messages (the backends read ids in chunks).
    many = [f"x{n}" for n in range(2500)]
    await reopened.commit(
        Commit(
            dataclasses.replace(active, version=1),
            1,
            seen_message_ids=tuple(many[::7]),
            sent_message_ids=tuple(many[3::500]),
        )
    )
    _, seen, sent = await reopened.read_for_webhook("ho_1", many)
    assert (seen, sent) == (set(many[::7]), set(many[3::500]))


async def test_a_webhook_planned_on_the_last_known_record_commits_only_if_it_still_holds(
    opener: Opener,
) -> None:
    """``last_known`` is the record as this process last read or wrote it; ``commit_if_new``
    applies a change planned on it only while the record is at that version and none of the
    webhook's message ids is known, and otherwise writes nothing and answers with what
    ``read_for_webhook`` reads, to plan again on."""
    store = await opener()
    h, _ = await store.create_handoff(sample_handoff(1))
    assert store.last_known("ho_1") == h
    assert store.last_known("nope") is None
    agent = Agent("A", "Ann")
    active = dataclasses.replace(h, state=HandoffState.ACTIVE)
    first = Commit(
        active, 0, events=(NewEvent(5, AgentMessage("m1", agent, "one")),), seen_message_ids=("m1",)
    )
    stored = await store.commit_if_new(first, ["m1"])
    assert isinstance(stored, list)
    assert [(e.handoff_id, e.payload) for e in stored] == [("ho_1", first.events[0].payload)]
    at_1 = dataclasses.replace(active, version=1)
    assert store.last_known("ho_1") == at_1
    # Brevo sends the same message again: refused, with the read that shows it handled.
    again = Commit(at_1, 1, events=first.events, seen_message_ids=("m1",))
    assert await store.commit_if_new(again, ["m1", "m2", "m1"]) == (at_1, {"m1"}, set())
    # A message the service posted itself: refused likewise, with it among the sent.
    await store.commit(Commit(at_1, 1, sent_message_ids=("s1",)))
    at_2 = dataclasses.replace(active, version=2)
    echo = Commit(at_2, 2, events=(NewEvent(6, AgentMessage("s1", agent, "mine")),))
    assert await store.commit_if_new(echo, ["s1"]) == (at_2, set(), {"s1"})
    # Planned on a version since moved on (another process committed): refused, with the
    # record as it is now; a webhook without message ids too.
    behind = Commit(at_1, 1, events=(NewEvent(7, AgentMessage("m3", agent, "three")),))
    assert await store.commit_if_new(behind, ["m3", "m1"]) == (at_2, {"m1"}, set())
    assert await store.commit_if_new(dataclasses.replace(behind, events=()), []) == (
        at_2,
        set(),
        set(),
    )
    # None of the refusals wrote anything.
    assert await store.read_events("ho_1", 0, 100) == stored
    assert await store.get_handoff("ho_1") == at_2
    # A handoff that does not exist (expired from Redis since it was routed).
    ghost = sample_handoff(9)
    assert await store.commit_if_new(Commit(ghost, 0), ["m1"]) == (None, set(), set())
    # Planned on what is current, with new ids: applied, like ``commit``.
    fresh = Commit(at_2, 2, events=(NewEvent(8, AgentMessage("m4", agent, "four")),))
    applied = await store.commit_if_new(fresh, ["m4"])
    assert isinstance(applied, list)
    assert [e.payload for e in applied] == [fresh.events[0].payload]
    assert store.last_known("ho_1") == dataclasses.replace(active, version=3)
    # Another process (a fresh store on the same data) has read nothing yet.
    await store.close()
    reopened = await opener()
    assert reopened.last_known("ho_1") is None
    assert await reopened.get_handoff("ho_1") == dataclasses.replace(active, version=3)
    assert reopened.last_known("ho_1") == dataclasses.replace(active, version=3)


async def test_commit_is_atomic_and_versioned(opener: Opener) -> None:
    store = await opener()
    h, _ = await store.create_handoff(sample_handoff(1))
    agent = Agent("A", "Ann")
    events = (
        NewEvent(5, AgentMessage("m1", agent, "one")),
        NewEvent(6, AgentMessage("m2", agent, "two")),
    )
    active = dataclasses.replace(h, state=HandoffState.ACTIVE, agents=(agent,))
    stored = await store.commit(
        Commit(
            active,
            0,
            events=events,
            seen_message_ids=("m1", "m2"),
            sent_message_ids=("s1",),
            client_message=("c1", "s1"),
        )
    )
    assert [e.payload for e in stored] == [e.payload for e in events]
    assert stored[1].seq == stored[0].seq + 1
    # A writer that read version 0 loses, and nothing of its commit lands.
    with pytest.raises(ConcurrentUpdate):
        await store.commit(
            Commit(h, 0, events=(NewEvent(7, NoAgentAvailable()),), seen_message_ids=("m3",))
        )
    assert await store.read_events("ho_1", 0, 100) == stored
    assert await known(store, "ho_1", ["m1", "m2", "m3", "s1"]) == (
        {"m1", "m2"},
        {"s1"},
    )
    assert await known(store, "ho_1", []) == (set(), set())
    assert await store.client_message("ho_1", "c1") == "s1"
    assert await store.client_message("ho_1", "c2") is None
    current = await store.get_handoff("ho_1")
    assert current == dataclasses.replace(active, version=1)


async def test_read_events_pages_filters_and_knows_the_last_position(opener: Opener) -> None:
    store = await opener()
    assert await store.last_seq() == 0
    a, _ = await store.create_handoff(sample_handoff(1))
    b, _ = await store.create_handoff(sample_handoff(2))
    for i in range(5):
        for h in (a, b):
            current = await store.get_handoff(h.id)
            assert current is not None
            await store.commit(
                Commit(current, current.version, events=(NewEvent(i, NoAgentAvailable()),))
            )
    everything = await store.read_events(None, 0, 100)
    assert len(everything) == 10
    assert [e.seq for e in everything] == sorted(e.seq for e in everything)
    only_a = await store.read_events("ho_1", 0, 100)
    assert [e.handoff_id for e in only_a] == ["ho_1"] * 5
    page = await store.read_events(None, everything[3].seq, 4)
    assert page == everything[4:8]
    assert await store.last_seq() == everything[-1].seq


async def test_listener_gets_every_commit_in_log_order(opener: Opener) -> None:
    store = await opener()
    received: list[StoredEvent] = []
    interruptions: list[HandoffError] = []

    def listen(events: Sequence[StoredEvent]) -> None:
        received.extend(events)

    store.set_listener(listen, interruptions.append)
    for n in range(20):
        await store.create_handoff(sample_handoff(n))
    await store.ping()  # ready: from here on no commit may be missed
    interruptions.clear()  # a feed may announce its start, before it is ready

    async def write(n: int) -> None:
        h = await store.get_handoff(f"ho_{n}")
        assert h is not None
        await store.commit(Commit(h, h.version, events=(NewEvent(n, NoAgentAvailable()),)))

    await asyncio.gather(*(write(n) for n in range(20)))
    # A shared backend delivers through its feed: allow it a moment.
    await until(lambda: len(received) >= 20, what="20 events delivered")
    assert [e.seq for e in received] == sorted(e.seq for e in received)
    assert received == await store.read_events(None, 0, 100)
    await asyncio.sleep(0.05)
    assert (len(received), interruptions) == (20, [])


async def test_commits_made_at_once_stand_or_fall_alone(opener: Opener) -> None:
    """Commits made in one turn of the event loop (SQLite writes them in one transaction):
    one refused for its version leaves the others whole, and each answer is its own."""
    store = await opener()
    received: list[StoredEvent] = []
    store.set_listener(received.extend, lambda exc: None)
    handoffs = [(await store.create_handoff(sample_handoff(n)))[0] for n in range(6)]
    first = await store.commit(Commit(handoffs[0], 0, events=(NewEvent(1, NoAgentAvailable()),)))
    await until(lambda: len(received) == 1, what="the first event delivered")

    def message(n: int) -> NewEvent:
        return NewEvent(n, AgentMessage(f"m{n}", Agent("A"), f"text {n}"))

    commits = [
        Commit(handoffs[0], 0, events=(message(0),), seen_message_ids=("stale",)),  # stale
        *(
            Commit(
                dataclasses.replace(h, state=HandoffState.ACTIVE),
                0,
                events=(message(n), message(n + 100)),
                seen_message_ids=(f"m{n}",),
            )
            for n, h in enumerate(handoffs[1:], start=1)
        ),
        Commit(handoffs[0], 1, events=(message(50),), client_message=("c", "b")),
    ]
    outcomes = await asyncio.gather(*(store.commit(c) for c in commits), return_exceptions=True)

    assert isinstance(outcomes[0], ConcurrentUpdate)
    answered = [o for o in outcomes[1:] if not isinstance(o, BaseException)]
    assert len(answered) == 6, outcomes
    assert [[e.payload for e in o] for o in answered] == [
        [e.payload for e in c.events] for c in commits[1:]
    ]
    # Each commit's events are consecutive in the log; the commits, in some order.
    for o in answered:
        assert [e.seq for e in o] == list(range(o[0].seq, o[0].seq + len(o)))
    everything = sorted((e for o in answered for e in o), key=lambda e: e.seq)
    assert [e.seq for e in everything] == list(range(first[0].seq + 1, first[0].seq + 12))
    await until(lambda: len(received) == 12, what="every event delivered")
    assert received == [*first, *everything]
    assert await store.read_events(None, 0, 100) == received
    # Nothing of the refused commit landed; all of the others did.
    assert await known(store, "ho_0", ["stale"]) == (set(), set())
    assert await store.client_message("ho_0", "c") == "b"
    for n in range(1, 6):
        assert await known(store, f"ho_{n}", [f"m{n}"]) == ({f"m{n}"}, set())
        stored = await store.get_handoff(f"ho_{n}")
        assert stored is not None
        assert (stored.state, stored.version) == (HandoffState.ACTIVE, 1)
    zeroth = await store.get_handoff("ho_0")
    assert zeroth is not None
    assert zeroth.version == 2


async def test_commits_still_queued_when_the_store_closes_are_written_first(
    opener: Opener,
) -> None:
    store = await opener()
    handoffs = [(await store.create_handoff(sample_handoff(n)))[0] for n in range(3)]
    writes = [
        asyncio.ensure_future(store.commit(Commit(h, 0, events=(NewEvent(n, NoAgentAvailable()),))))
        for n, h in enumerate(handoffs)
    ]
    await asyncio.sleep(0)  # the commits are made, and wait for their turn
    await store.close()
    written = [await w for w in writes]
    reopened = await opener()
    assert await reopened.read_events(None, 0, 10) == sorted(
        (e for w in written for e in w), key=lambda e: e.seq
    )
    for n in range(3):
        again = await reopened.get_handoff(f"ho_{n}")
        assert again is not None
        assert again.version == 1


async def test_a_commit_leaving_the_record_as_it_was_moves_its_version_for_every_read(
    opener: Opener,
) -> None:
    """The usual webhook adds events and message ids and leaves the record as it was (SQLite
    then writes only the version column): every read, before and after reopening, has the
    new version, and a writer that read the old one still loses."""
    store = await opener()
    pending, _ = await store.create_handoff(
        dataclasses.replace(sample_handoff(1), brevo_conversation_id="chat-1")
    )
    for expected in (0, 1):
        current = await store.get_handoff("ho_1")
        assert current is not None
        assert current.version == expected
        await store.commit(
            Commit(
                current,
                expected,
                events=(NewEvent(expected, NoAgentAvailable()),),
                seen_message_ids=(f"m{expected}",),
            )
        )
    with pytest.raises(ConcurrentUpdate):
        await store.commit(Commit(pending, 1, seen_message_ids=("stale",)))
    await store.close()
    reopened = await opener()
    at_two = dataclasses.replace(pending, version=2)
    assert await reopened.get_handoff("ho_1") == at_two
    assert await reopened.find_open_by_conversation("conv-1") == at_two
    assert await reopened.find_by_brevo_conversation("chat-1") == at_two
    assert await reopened.pending_before(10_000) == [at_two]
    assert await known(reopened, "ho_1", ["m0", "m1", "stale"]) == ({"m0", "m1"}, set())
    with pytest.raises(ConcurrentUpdate):
        await reopened.commit(Commit(pending, 1, seen_message_ids=("stale",)))
    ended = dataclasses.replace(at_two, state=HandoffState.ENDED, end_reason=EndReason.TIMED_OUT)
    await reopened.commit(Commit(ended, 2))
    assert await reopened.get_handoff("ho_1") == dataclasses.replace(ended, version=3)


async def test_everything_survives_reopening(opener: Opener) -> None:
    store = await opener()
    h, _ = await store.create_handoff(sample_handoff(1))
    ended = dataclasses.replace(h, state=HandoffState.ENDED, end_reason=EndReason.STOPPED_BY_BOT)
    stored = await store.commit(
        Commit(
            ended,
            0,
            events=(NewEvent(9, HandoffEnded(EndReason.STOPPED_BY_BOT)),),
            seen_message_ids=("x",),
            client_message=("c", "b"),
        )
    )
    await store.close()
    reopened = await opener()
    assert await reopened.get_handoff("ho_1") == dataclasses.replace(ended, version=1)
    assert await reopened.read_events("ho_1", 0, 10) == stored
    assert await known(reopened, "ho_1", ["x"]) == ({"x"}, set())
    assert await reopened.client_message("ho_1", "c") == "b"
    later, _ = await reopened.create_handoff(sample_handoff(2))
    new = await reopened.commit(Commit(later, 0, events=(NewEvent(1, NoAgentAvailable()),)))
    assert new[0].seq > stored[0].seq  # positions are never reused


async def test_ping_answers_while_open_and_fails_clearly_once_closed(opener: Opener) -> None:
    store = await opener()
    await store.ping()
    await store.close()
    with pytest.raises(StoreUnavailable):
        await store.ping()


async def test_pending_before(opener: Opener) -> None:
    store = await opener()
    for n in (1, 2, 3):
        await store.create_handoff(sample_handoff(n))
    h2 = await store.get_handoff("ho_2")
    assert h2 is not None
    await store.commit(Commit(dataclasses.replace(h2, state=HandoffState.ACTIVE), 0))
    assert [h.id for h in await store.pending_before(1003)] == ["ho_1"]
    assert [h.id for h in await store.pending_before(2000)] == ["ho_1", "ho_3"]


async def test_held_due_lists_handoffs_holding_messages_by_release_time(opener: Opener) -> None:
    store = await opener()
    message = AgentMessage("m1", Agent("A1", "Ann"), "held")
    for n, release_at in ((1, 500), (2, 300), (3, None)):
        h, _ = await store.create_handoff(sample_handoff(n))
        held = () if release_at is None else (HeldMessage(message, 10, 20, release_at),)
        await store.commit(Commit(dataclasses.replace(h, held=held), 0))
    assert [h.id for h in await store.held_due(299)] == []
    assert [h.id for h in await store.held_due(300)] == ["ho_2"]
    due = await store.held_due(10_000)
    assert [h.id for h in due] == ["ho_2", "ho_1"]
    assert due[1].held == (HeldMessage(message, 10, 20, 500),)  # the record keeps them
    # Released: no longer listed; the record survives reopening with what it still holds.
    h2 = due[0]
    await store.commit(Commit(dataclasses.replace(h2, held=()), h2.version))
    await store.close()
    reopened = await opener()
    assert [h.id for h in await reopened.held_due(10_000)] == ["ho_1"]


async def test_lookups_follow_every_commit_whether_or_not_it_changes_what_they_use(
    opener: Opener,
) -> None:
    """Commits that change only the record (SQLite then leaves its indexes alone) alternate
    with commits that change what the lookups use; every lookup answers from the last one,
    before and after reopening."""
    store = await opener()
    h, _ = await store.create_handoff(sample_handoff(1))
    message = AgentMessage("m1", Agent("A1", "Ann"), "held")
    steps = [
        dataclasses.replace(h, metadata={"k": "v2"}),
        dataclasses.replace(h, metadata={"k": "v2"}, brevo_conversation_id="B1"),
        dataclasses.replace(h, metadata={"k": "v3"}, brevo_conversation_id="B1"),
    ]
    for version, step in enumerate(steps):
        await store.commit(Commit(step, version))
    named = await store.find_by_brevo_conversation("B1")
    assert named is not None
    assert named.version == 3
    active = dataclasses.replace(steps[-1], state=HandoffState.ACTIVE, agents=(Agent("A1"),))
    holding = dataclasses.replace(active, held=(HeldMessage(message, 10, 20, 300),))
    still_holding = dataclasses.replace(holding, updated_at_ms=5000)
    for version, step in enumerate((active, holding, still_holding), start=len(steps)):
        await store.commit(Commit(step, version))

    async def answers(s: HandoffStore) -> tuple[object, ...]:
        found = await s.find_by_brevo_conversation("B1")
        open_one = await s.find_open_by_conversation("conv-1")
        return (
            found.version if found else None,
            open_one.version if open_one else None,
            [x.id for x in await s.pending_before(10_000)],
            [x.id for x in await s.held_due(300)],
        )

    assert await answers(store) == (6, 6, [], ["ho_1"])
    released = dataclasses.replace(still_holding, held=(), updated_at_ms=6000)
    await store.commit(Commit(released, 6))
    assert await answers(store) == (7, 7, [], [])
    await store.close()
    store = await opener()
    assert await answers(store) == (7, 7, [], [])
    current = await store.get_handoff("ho_1")
    assert current == dataclasses.replace(released, version=7)
    ended = dataclasses.replace(
        released, state=HandoffState.ENDED, end_reason=EndReason.AGENT_CLOSED
    )
    await store.commit(Commit(ended, 7))
    assert await answers(store) == (8, None, [], [])
    # The conversation is free for a new handoff.
    _, created = await store.create_handoff(sample_handoff(2, conversation="conv-1"))
    assert created


async def test_a_sqlite_file_has_one_process_at_a_time(tmp_path: Path) -> None:
    """The SQLite store keeps records in memory, so a second writer would make them stale:
    it is refused with what to do instead, and the file is free again once closed."""
    path = str(tmp_path / "one.db")
    first = await SqliteStore.open(path)
    try:
        with pytest.raises(StoreUnavailable) as refused:
            await SqliteStore.open(path)
        assert str(refused.value) == (
            "the SQLite store failed: another process is using this file; each process needs "
            "a HANDOFF_SQLITE_PATH of its own, and replicas that share their state need "
            "REDIS_URL"
        )
    finally:
        await first.close()
    second = await SqliteStore.open(path)
    await second.close()


async def test_sqlite_answers_known_ids_from_memory_and_only_what_the_file_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SQLite store keeps a handoff's message ids beside its record (as fingerprints):
    the next webhooks' new ids are answered without a statement, and those that may be known
    are confirmed where they would be kept; a commit rolled back leaves none of its ids
    behind, a cached handoff's ids grow past IDS_LOADED, and a handoff holding more than
    that in the file is asked of the file each time."""
    store = await SqliteStore.open(str(tmp_path / "ids.db"))
    statements: list[str] = []
    store._db().set_trace_callback(statements.append)  # the store's own writing connection

    def id_reads() -> tuple[int, int, int]:
        return id_statements(statements)

    try:
        h, _ = await store.create_handoff(sample_handoff(1))
        assert await known(store, "ho_1", ["m1"]) == (set(), set())
        assert id_reads() == (1, 0, 0)  # the first webhook reads the handoff's ids once
        active = dataclasses.replace(h, state=HandoffState.ACTIVE)
        await store.commit(Commit(active, 0, seen_message_ids=("m1",), sent_message_ids=("s1",)))
        assert await known(store, "ho_1", ["m2", "m3"]) == (set(), set())
        assert id_reads() == (1, 0, 0)  # new ids: no statement
        assert await known(store, "ho_1", ["m1", "s1", "m2"]) == ({"m1"}, {"s1"})
        assert id_reads() == (1, 0, 2)  # m1 confirmed as seen, s1 as sent
        sent_confirmation = [s for s in statements if "FROM sent_messages" in s][-1]
        assert "FROM seen_messages" not in sent_confirmation  # an echo's: one key lookup

        # A batch that fails as a whole: its ids must not be taken for seen.
        def failing(payload: EventPayload) -> str:
            if isinstance(payload, AgentMessage) and payload.text == "boom":
                raise sqlite3.OperationalError("disk I/O error")
            return payload_to_json(payload)

        monkeypatch.setattr(sqlite_module, "payload_to_json", failing)
        boom = NewEvent(1, AgentMessage("m2", Agent("A"), "boom"))
        with pytest.raises(StoreUnavailable):
            await store.commit(Commit(dataclasses.replace(active, version=1), 1, (boom,), ("m2",)))
        assert await known(store, "ho_1", ["m1", "m2"]) == ({"m1"}, set())
        monkeypatch.setattr(sqlite_module, "payload_to_json", payload_to_json)

        # A cached handoff's ids keep growing past IDS_LOADED, kept in memory.
        monkeypatch.setattr(sqlite_module, "IDS_LOADED", 3)
        loads, lookups, confirmations = id_reads()  # the failed batch: the handoff forgotten
        await store.commit(
            Commit(dataclasses.replace(active, version=1), 1, seen_message_ids=("m3", "m4"))
        )
        assert await known(store, "ho_1", ["m1", "m3", "m4", "s1", "m5"]) == (
            {"m1", "m3", "m4"},
            {"s1"},
        )
        assert await known(store, "ho_1", ["m5", "m6"]) == (set(), set())
        assert id_reads() == (loads, lookups, confirmations + 2)

        # Read again from a file holding more than IDS_LOADED ids, they are not loaded:
        # still right, from the file, each time.
        await store.close()
        store = await SqliteStore.open(str(tmp_path / "ids.db"))
        statements.clear()
        store._db().set_trace_callback(statements.append)
        assert await known(store, "ho_1", ["m1", "m3", "m4", "s1", "m5"]) == (
            {"m1", "m3", "m4"},
            {"s1"},
        )
        await store.commit(
            Commit(dataclasses.replace(active, version=2), 2, seen_message_ids=("m5",))
        )
        assert await known(store, "ho_1", ["m4", "m5", "m6"]) == ({"m4", "m5"}, set())
        # the first read tried to load all (more than 3: not kept), then each asked for its own
        assert id_reads() == (1, 2, 0)
    finally:
        await store.close()


async def test_sqlite_keeps_a_message_id_with_its_event_and_the_others_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent message's id is stored in its event's row (one place less to write for the
    usual webhook); the ids of messages dropped or held go to seen_messages. Both are known
    after reopening, whether the first webhook loads all of a handoff's ids or asks for its
    own."""
    path = str(tmp_path / "carried.db")
    store = await SqliteStore.open(path)
    try:
        h, _ = await store.create_handoff(sample_handoff(1))
        active = dataclasses.replace(h, state=HandoffState.ACTIVE)
        held = HeldMessage(AgentMessage("m3", Agent("A"), "later"), 1, 1, 99)
        await store.commit(
            Commit(
                dataclasses.replace(active, held=(held,)),
                0,
                events=(NewEvent(5, AgentMessage("m1", Agent("A"), "one")),),
                seen_message_ids=("m1", "dropped-2", "m3"),
            )
        )
        db = store._db()
        assert db.execute(
            "SELECT message_id FROM events WHERE handoff_id = 'ho_1' ORDER BY seq"
        ).fetchall() == [("m1",)]
        assert db.execute("SELECT message_id FROM seen_messages ORDER BY 1").fetchall() == [
            ("dropped-2",),
            ("m3",),
        ]
    finally:
        await store.close()
    for loaded in (sqlite_module.IDS_LOADED, 0):  # all ids loaded, or each webhook's asked
        monkeypatch.setattr(sqlite_module, "IDS_LOADED", loaded)
        reopened = await SqliteStore.open(path)
        try:
            for _ in range(2):
                assert await known(reopened, "ho_1", ["m1", "dropped-2", "m3", "m4"]) == (
                    {"m1", "dropped-2", "m3"},
                    set(),
                )
        finally:
            await reopened.close()


async def test_a_sqlite_file_made_before_message_ids_went_with_events_keeps_its_ids(
    tmp_path: Path,
) -> None:
    """A file whose events have no message_id column (every id in seen_messages, the index
    on (handoff_id, seq)) gets the column, its events copied to handoff_events and the index
    dropped; its ids and events are still found."""
    path = tmp_path / "older.db"
    made = sqlite3.connect(path)
    made.executescript(
        """
        CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            handoff_id TEXT NOT NULL,
            conversation_id TEXT NOT NULL,
            occurred_at_ms INTEGER NOT NULL,
            payload TEXT NOT NULL,
            received_at_ms INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX events_by_handoff ON events (handoff_id, seq);
        CREATE TABLE seen_messages (
            handoff_id TEXT NOT NULL,
            message_id TEXT NOT NULL,
            PRIMARY KEY (handoff_id, message_id)
        ) WITHOUT ROWID;
        INSERT INTO seen_messages VALUES ('ho_1', 'old-1');
        """
    )
    old_event = payload_to_json(AgentMessage("old-1", Agent("A"), "before"))
    made.execute(
        "INSERT INTO events (handoff_id, conversation_id, occurred_at_ms, payload)"
        " VALUES ('ho_1', 'conv-1', 5, ?)",
        (old_event,),
    )
    made.commit()
    made.close()
    store = await SqliteStore.open(str(path))
    try:
        h, _ = await store.create_handoff(sample_handoff(1))
        assert await known(store, "ho_1", ["old-1", "new-2"]) == ({"old-1"}, set())
        await store.commit(
            Commit(
                h,
                0,
                events=(NewEvent(6, AgentMessage("new-2", Agent("A"), "after")),),
                seen_message_ids=("new-2",),
            )
        )
        db = store._db()
        indexes = db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'events'"
        )
        assert [name for (name,) in indexes] == []  # a webhook writes its event's page only
        # The old event was copied to handoff_events on opening; the new one waits for the
        # next bulk copy, found meanwhile among the newest events.
        assert db.execute("SELECT * FROM handoff_events").fetchall() == [("ho_1", 1, None)]
        assert db.execute("SELECT * FROM store_state").fetchall() == [("handoff_events_through", 1)]
        assert [e.payload for e in await store.read_events("ho_1", 0, 10)] == [
            AgentMessage("old-1", Agent("A"), "before"),
            AgentMessage("new-2", Agent("A"), "after"),
        ]
    finally:
        await store.close()
    reopened = await SqliteStore.open(str(path))
    try:
        assert await known(reopened, "ho_1", ["old-1", "new-2", "x"]) == (
            {"old-1", "new-2"},
            set(),
        )
    finally:
        await reopened.close()


def _mark(store: SqliteStore) -> int:
    """The last event copied to handoff_events."""
    row = (
        store._db()
        .execute("SELECT value FROM store_state WHERE key = 'handoff_events_through'")
        .fetchone()
    )
    return int(row[0])


@pytest.mark.parametrize("synchronous", ["NORMAL", "FULL"])
async def test_sqlite_copies_a_handoffs_events_in_bulk_and_reads_the_copy_and_the_rest_as_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synchronous: str
) -> None:
    """A webhook writes its event only; every INDEX_EVERY events the newest go to
    handoff_events together. A handoff's replay and its message ids come from both places,
    the copied and the newest, whatever the cursor and the limit, and reopening copies the
    rest."""
    monkeypatch.setattr(sqlite_module, "INDEX_EVERY", 3)
    path = str(tmp_path / "bulk.db")
    store = await SqliteStore.open(path, synchronous)
    statements: list[str] = []
    store._db().set_trace_callback(statements.append)
    expected: dict[str, list[tuple[int, str]]] = {"ho_1": [], "ho_2": []}  # (seq, message id)
    try:
        handoffs = {}
        for n in (1, 2):
            h, _ = await store.create_handoff(sample_handoff(n))
            handoffs[h.id] = h
        marks = []
        for n in range(8):  # the two handoffs taking turns
            h = handoffs["ho_1" if n % 2 == 0 else "ho_2"]
            message = AgentMessage(f"m{n}", Agent("A"), f"text {n}")
            [stored] = await store.commit(
                Commit(h, h.version, events=(NewEvent(n, message),), seen_message_ids=(f"m{n}",))
            )
            handoffs[h.id] = h.at_version(h.version + 1)
            expected[h.id].append((stored.seq, f"m{n}"))
            marks.append(_mark(store))
        assert [seq for seqs in expected.values() for seq, _ in seqs] == [1, 3, 5, 7, 2, 4, 6, 8]
        assert marks == [0, 0, 3, 3, 3, 6, 6, 6]
        assert sum("INTO handoff_events" in s for s in statements) == 2  # the two bulk copies
        assert store._db().execute("SELECT * FROM handoff_events ORDER BY seq").fetchall() == [
            ("ho_1" if seq % 2 else "ho_2", seq, f"m{seq - 1}") for seq in range(1, 7)
        ]

        async def replays_right() -> None:
            for handoff_id, events in expected.items():
                for cursor in range(9):
                    for limit in (1, 2, 10):
                        replay = await store.read_events(handoff_id, cursor, limit)
                        assert [(e.seq, e.handoff_id) for e in replay] == [
                            (seq, handoff_id) for seq, _ in events if seq > cursor
                        ][:limit], (handoff_id, cursor, limit)
                assert [
                    e.payload.brevo_message_id
                    for e in await store.read_events(handoff_id, 0, 10)
                    if isinstance(e.payload, AgentMessage)
                ] == [message_id for _, message_id in events]

        await replays_right()
        # Message ids from both places: ho_1's asked of the file each time (none loaded),
        # ho_2's loaded whole, then each possible match confirmed with the file.
        monkeypatch.setattr(sqlite_module, "IDS_LOADED", 0)
        assert await known(store, "ho_1", ["m0", "m6", "m1", "new"]) == ({"m0", "m6"}, set())
        monkeypatch.setattr(sqlite_module, "IDS_LOADED", 10_000)
        assert await known(store, "ho_2", ["m1", "m7", "m0", "new"]) == ({"m1", "m7"}, set())
        await store.close()
        store = await SqliteStore.open(path, synchronous)
        assert _mark(store) == 8  # the rest copied on opening
        await replays_right()
        assert await known(store, "ho_1", ["m0", "m6", "m1", "new"]) == ({"m0", "m6"}, set())
    finally:
        await store.close()


async def test_sqlite_commits_go_on_when_the_bulk_copy_fails_and_the_next_one_catches_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """handoff_events is derived: a copy that fails costs the commits nothing (they are
    stored, each answered with its event) and the reads nothing (the newest events are
    scanned); the next copy takes everything since the last one that worked."""
    monkeypatch.setattr(sqlite_module, "INDEX_EVERY", 2)
    store = await SqliteStore.open(str(tmp_path / "fails.db"))
    copy = SqliteStore._index_tail
    failures = [sqlite3.OperationalError("database or disk is full")]

    def failing_once(self: SqliteStore, db: sqlite3.Connection) -> None:
        if failures:
            raise failures.pop()
        copy(self, db)

    monkeypatch.setattr(SqliteStore, "_index_tail", failing_once)
    try:
        h, _ = await store.create_handoff(sample_handoff(1))
        seqs = []
        for n in range(4):
            message = AgentMessage(f"m{n}", Agent("A"), f"text {n}")
            [stored] = await store.commit(Commit(h, h.version, events=(NewEvent(n, message),)))
            h = h.at_version(h.version + 1)
            seqs.append(stored.seq)
            if n == 1:  # the first copy failed: nothing copied, everything read
                assert _mark(store) == 0
                assert [e.seq for e in await store.read_events("ho_1", 0, 10)] == seqs
        assert "copying 2 events to handoff_events failed" in caplog.text
        assert _mark(store) == 4
        assert [row[0] for row in store._db().execute("SELECT seq FROM handoff_events")] == seqs
        assert [e.seq for e in await store.read_events("ho_1", 0, 10)] == seqs == [1, 2, 3, 4]
    finally:
        await store.close()


async def test_sqlite_commits_made_in_the_next_turn_join_the_same_transaction(
    tmp_path: Path,
) -> None:
    """The group commit goes at the end of the event loop's next turn: a commit made in that
    turn (a request read meanwhile) goes in the same transaction as the one before it."""
    store = await SqliteStore.open(str(tmp_path / "turns.db"))
    statements: list[str] = []
    store._db().set_trace_callback(statements.append)
    try:
        a, _ = await store.create_handoff(sample_handoff(1))
        b, _ = await store.create_handoff(sample_handoff(2))
        statements.clear()

        async def one_turn_later() -> list[StoredEvent]:
            await asyncio.sleep(0)
            return await store.commit(Commit(b, 0, events=(NewEvent(2, NoAgentAvailable()),)))

        first = store.commit(Commit(a, 0, events=(NewEvent(1, NoAgentAvailable()),)))
        stored = await asyncio.gather(first, one_turn_later())
        assert [[e.handoff_id for e in s] for s in stored] == [["ho_1"], ["ho_2"]]
        assert [s for s in statements if s in ("BEGIN IMMEDIATE", "COMMIT")] == [
            "BEGIN IMMEDIATE",
            "COMMIT",
        ]
    finally:
        await store.close()


async def test_sqlite_keeps_the_usual_commits_versions_in_memory_and_never_goes_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With statements on the event loop, a commit leaving the record as it was moves the
    version in memory only (no statement on handoffs); every read gives memory's version,
    a record evicted from the cache and read from the file again included, so that a
    writer holding an older version still loses; the versions reach the file with the
    checkpoints (every CHECKPOINT_EVERY commits) and on closing."""
    monkeypatch.setattr(sqlite_module, "RECORDS_CACHED", 1)
    monkeypatch.setattr(sqlite_module, "CHECKPOINT_EVERY", 5)
    path = tmp_path / "versions.db"
    store = await SqliteStore.open(str(path))
    statements: list[str] = []
    store._db().set_trace_callback(statements.append)

    def in_file(handoff_id: str) -> int:
        peek = sqlite3.connect(path)
        try:
            row = peek.execute("SELECT version FROM handoffs WHERE id = ?", (handoff_id,))
            return int(row.fetchone()[0])
        finally:
            peek.close()

    try:
        created, _ = await store.create_handoff(
            dataclasses.replace(sample_handoff(1), brevo_conversation_id="chat-1")
        )
        statements.clear()
        for version in range(3):
            await store.commit(
                Commit(created.at_version(version), version, seen_message_ids=(f"m{version}",))
            )
        assert not [s for s in statements if s.startswith("UPDATE handoffs")]
        assert in_file("ho_1") == 0
        at_three = created.at_version(3)
        assert await store.get_handoff("ho_1") == at_three
        # ho_2 takes the one cached place: ho_1 is read from the file from now on.
        await store.create_handoff(sample_handoff(2))
        assert await store.get_handoff("ho_2") is not None
        assert in_file("ho_1") == 0
        assert await store.find_by_brevo_conversation("chat-1") == at_three
        assert await store.find_open_by_conversation("conv-1") == at_three
        assert await store.pending_before(10_000) == [at_three, sample_handoff(2)]
        assert await store.get_handoff("ho_1") == at_three
        for stale in (0, 2):
            with pytest.raises(ConcurrentUpdate):
                await store.commit(
                    Commit(created.at_version(stale), stale, seen_message_ids=("x",))
                )
        # Evicted, then changed: the statement writes the record at memory's version + 1.
        await store.create_handoff(sample_handoff(3))  # evicts ho_1 again
        ended = dataclasses.replace(
            at_three, state=HandoffState.ENDED, end_reason=EndReason.TIMED_OUT
        )
        await store.commit(Commit(ended, 3))
        assert in_file("ho_1") == 4
        assert await store.get_handoff("ho_1") == ended.at_version(4)
        # The fifth commit since the last checkpoint writes memory's versions first.
        h3 = await store.get_handoff("ho_3")
        assert h3 is not None
        if store._checkpoint is not None:  # one started by the commits above
            await store._checkpoint
        store._commits_unchecked = 0
        for version in range(4):
            await store.commit(Commit(h3.at_version(version), version, seen_message_ids=("a",)))
        assert in_file("ho_3") == 0
        await store.commit(Commit(h3.at_version(4), 4, seen_message_ids=("b",)))
        assert in_file("ho_3") == 5
        assert await store.get_handoff("ho_3") == h3.at_version(5)
        # Memory's versions reach the file on closing too.
        await store.commit(Commit(h3.at_version(5), 5, seen_message_ids=("c",)))
        assert in_file("ho_3") == 5
    finally:
        await store.close()
    assert in_file("ho_3") == 6
    reopened = await SqliteStore.open(str(path))
    try:
        assert await reopened.get_handoff("ho_3") == h3.at_version(6)
    finally:
        await reopened.close()


async def test_a_new_sqlite_file_has_small_pages_and_an_older_file_keeps_its_own(
    tmp_path: Path,
) -> None:
    older = tmp_path / "older.db"
    made = sqlite3.connect(older)
    made.execute("PRAGMA page_size=4096")
    made.execute("CREATE TABLE earlier (x)")
    made.close()
    for path, size in ((tmp_path / "new.db", sqlite_module.PAGE_SIZE), (older, 4096)):
        store = await SqliteStore.open(str(path))
        try:
            h, _ = await store.create_handoff(sample_handoff(1))
            await store.commit(Commit(h, 0, events=(NewEvent(1, NoAgentAvailable()),)))
            assert store._db().execute("PRAGMA page_size").fetchone() == (size,)
        finally:
            await store.close()
    assert sqlite_module.PAGE_SIZE == 2048


async def test_sqlite_keeps_the_ids_of_the_handoffs_used_last_within_its_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past IDS_CACHED ids in all, the handoffs whose webhooks came least recently give
    theirs up, rather than every new handoff asking the file at each of its webhooks. A
    handoff that gave its ids up asks the file for its own ids at each webhook until they fit
    in the room left free, and never loads them whole by dropping another's: handoffs taking
    turns (as webhooks do) then made every webhook read all of its handoff's ids."""
    monkeypatch.setattr(sqlite_module, "IDS_CACHED", 5)
    store = await SqliteStore.open(str(tmp_path / "budget.db"))
    statements: list[str] = []
    store._db().set_trace_callback(statements.append)

    def id_reads() -> tuple[int, int]:
        """Whole loads (LIMIT), and lookups of a webhook's own ids in the file (IN) by a
        handoff whose ids are not in memory (a cached one's confirmations left out)."""
        return id_statements(statements)[:2]

    try:
        handoffs = [(await store.create_handoff(sample_handoff(n)))[0] for n in range(4)]
        for n, h in enumerate(handoffs[:3]):  # two ids each: 2, 4, then 6 > 5
            assert await known(store, h.id, []) == (set(), set())
            await store.commit(Commit(h, 0, seen_message_ids=(f"a{n}", f"b{n}")))
        assert id_reads() == (3, 0)  # each handoff's first webhook read its ids whole
        # ho_0 was used least recently: its ids went to make room for ho_2's.
        assert await known(store, "ho_2", ["a2", "x"]) == ({"a2"}, set())
        assert await known(store, "ho_1", ["b1"]) == ({"b1"}, set())
        assert id_reads() == (3, 0)
        # The three take turns: ho_0 asks the file for its own ids, each time, and the
        # others keep theirs (one id of room is left: ho_0's two do not fit).
        for _ in range(3):
            assert await known(store, "ho_0", ["a0", "b0", "x"]) == ({"a0", "b0"}, set())
            assert await known(store, "ho_1", ["a1"]) == ({"a1"}, set())
            assert await known(store, "ho_2", ["b2"]) == ({"b2"}, set())
        assert id_reads() == (3, 3)
        # What ho_0 stores while displaced is found in the file too.
        await store.commit(Commit(handoffs[0].at_version(1), 1, seen_message_ids=("c0",)))
        assert await known(store, "ho_0", ["c0", "y"]) == ({"c0"}, set())
        # A new handoff still gets a place, the least recently used (ho_1) giving theirs up.
        await store.commit(Commit(handoffs[3], 0, seen_message_ids=("a3", "b3")))
        assert await known(store, "ho_3", ["a3"]) == ({"a3"}, set())
        assert id_reads() == (4, 4)
        assert await known(store, "ho_3", ["b3", "z"]) == ({"b3"}, set())
        assert await known(store, "ho_1", ["a1", "b1"]) == ({"a1", "b1"}, set())
        assert id_reads() == (4, 5)
        # Once room is free (ho_2's record forgotten), ho_0's ids (three now) are loaded
        # whole again and answered from memory.
        store._forget("ho_2")
        assert await known(store, "ho_0", ["a0", "c0"]) == ({"a0", "c0"}, set())
        assert await known(store, "ho_0", ["b0"]) == ({"b0"}, set())
        assert id_reads() == (5, 5)
    finally:
        await store.close()


async def test_sqlite_checkpoints_on_its_thread_holding_commits_when_they_fall_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In NORMAL mode a commit never copies the write-ahead log into the file, nor does
    anything else on the event loop (that took milliseconds of it): the thread does, every
    CHECKPOINT_EVERY commits. Once the log is past WAL_FRAMES_MAX frames, commits wait
    (queued) while the thread copies what was appended during its checkpoint, so that the
    log can start over."""
    monkeypatch.setattr(sqlite_module, "CHECKPOINT_EVERY", 5)
    path = tmp_path / "wal.db"
    store = await SqliteStore.open(str(path))
    assert store._db().execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
    on_writer: list[str] = []
    store._db().set_trace_callback(on_writer.append)  # the store's own writing connection

    async def commits(first: int, count: int) -> None:
        for n in range(first, first + count):
            h, _ = await store.create_handoff(sample_handoff(n))
            await store.commit(Commit(dataclasses.replace(h, metadata={"n": "x" * 3000}), 0))

    def log_restarts() -> int:
        """The write-ahead log header's checkpoint sequence number: one more at each start
        over."""
        header = Path(str(path) + "-wal").read_bytes()[:16]
        return int.from_bytes(header[12:16], "big")

    # What each checkpoint found in the log (frames); the catch-up waits for the test, to
    # see commits wait for it.
    frames: list[int] = []
    held, let_go = asyncio.Event(), asyncio.Event()
    thread_read = store._read

    async def read(fn: Callable[[sqlite3.Connection], Any]) -> Any:
        if store._holding:
            held.set()
            await let_go.wait()
        found = await thread_read(fn)
        if isinstance(found, tuple) and len(found) == 3:
            frames.append(found[1])
        return found

    monkeypatch.setattr(store, "_read", read)
    try:
        empty = path.stat().st_size
        await commits(0, 12)  # a checkpoint or two, the log within WAL_FRAMES_MAX
        await until(lambda: path.stat().st_size > empty + 12 * 3000, what="the log copied")
        await until(lambda: store._checkpoint is None, what="the checkpoint done")
        assert frames
        assert not held.is_set()

        monkeypatch.setattr(sqlite_module, "WAL_FRAMES_MAX", 0)  # the log is "too long"
        made = 12
        while store._checkpoint is None:  # until a commit starts the next checkpoint
            assert made < 12 + 3 * 5, "no checkpoint started"
            await commits(made, 1)
            made += 1
        await asyncio.wait_for(held.wait(), 10)
        checkpoints = len(frames)
        waiting = asyncio.create_task(commits(made, 1))
        made += 1
        await asyncio.sleep(0.2)
        assert not waiting.done()  # queued while the thread copies
        restarts = log_restarts()
        let_go.set()
        await asyncio.wait_for(waiting, 10)
        await until(lambda: store._checkpoint is None, what="the checkpoint done")
        assert len(frames) == checkpoints + 1  # the catch-up
        # The whole log was copied, so the commit that waited started it over.
        assert log_restarts() == restarts + 1
        assert not [s for s in on_writer if "checkpoint" in s]
        assert [h.id for h in await store.pending_before(10_000)][:3] == ["ho_0", "ho_1", "ho_2"]
    finally:
        let_go.set()
        await store.close()
    reopened = await SqliteStore.open(str(path))
    try:
        assert len(await reopened.pending_before(10_000)) == made
    finally:
        await reopened.close()


def test_a_record_at_a_new_version_keeps_every_other_field() -> None:
    """``Handoff.at_version`` (what the stores cache after a commit) copies every field; the
    sample sets each one away from its default, so a field added later must be set here."""
    message = AgentMessage("m1", Agent("A1", "Ann"), "held")
    full = dataclasses.replace(
        sample_handoff(1),
        state=HandoffState.ENDED,
        version=4,
        end_reason=EndReason.AGENT_CLOSED,
        brevo_conversation_id="B1",
        agents=(Agent("A1", "Ann"),),
        no_agent_available=True,
        opening_parts=("a", "b"),
        opening_posted=1,
        held=(HeldMessage(message, 10, 20, 30),),
    )
    blank = Handoff("", "", "", HandoffState.PENDING_AGENT, 0, 0)
    for f in dataclasses.fields(Handoff):
        assert getattr(full, f.name) != getattr(blank, f.name), f.name
    moved = full.at_version(9)
    assert moved == dataclasses.replace(full, version=9)
    assert (full.version, moved.version) == (4, 9)
