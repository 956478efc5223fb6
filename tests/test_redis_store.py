"""What only the Redis backend does: the shared feed, trimming, expiry, resent commits,
leases across replicas, and Redis going away and coming back."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from redis.exceptions import DataError
from redis_server import RedisServer
from support import sample_handoff, until

from service.core.errors import (
    ConcurrentUpdate,
    CursorExpired,
    HandoffError,
    StoreUnavailable,
    StreamOverflow,
)
from service.core.models import (
    Commit,
    EndReason,
    HandoffEnded,
    HandoffState,
    NewEvent,
    NoAgentAvailable,
    StoredEvent,
)
from service.storage import redis_scripts, redis_store
from service.storage.redis_store import RedisSettings, RedisStore


class Feed:
    """What a store's listener received."""

    def __init__(self, store: RedisStore) -> None:
        self.events: list[StoredEvent] = []
        self.interruptions: list[HandoffError] = []
        store.set_listener(self.events.extend, self.interruptions.append)

    async def wait_for(self, count: int) -> list[StoredEvent]:
        await until(lambda: len(self.events) >= count, what=f"{count} events")
        return self.events


@pytest.fixture
def settings(redis_server: RedisServer) -> RedisSettings:
    return RedisSettings(redis_server.url, prefix=f"{{t{secrets.token_hex(6)}}}")


@pytest.fixture
async def stores(settings: RedisSettings) -> AsyncIterator[list[RedisStore]]:
    """Stores opened by the test; closed at its end."""
    opened: list[RedisStore] = []
    yield opened
    for store in opened:
        await store.close()


async def open_store(
    stores: list[RedisStore], settings: RedisSettings, **changes: object
) -> RedisStore:
    store = await RedisStore.open(dataclasses.replace(settings, **changes))  # type: ignore[arg-type]
    stores.append(store)
    return store


async def add_events(store: RedisStore, handoff_id: str, count: int) -> list[StoredEvent]:
    stored: list[StoredEvent] = []
    for i in range(count):
        current = await store.get_handoff(handoff_id)
        assert current is not None
        stored += await store.commit(
            Commit(current, current.version, events=(NewEvent(i, NoAgentAvailable()),))
        )
    return stored


async def test_every_replica_receives_every_commit_once_in_order(
    stores: list[RedisStore], settings: RedisSettings
) -> None:
    a = await open_store(stores, settings)
    b = await open_store(stores, settings)
    feed_a, feed_b = Feed(a), Feed(b)
    for n in range(6):
        await a.create_handoff(sample_handoff(n))

    async def write(store: RedisStore, n: int) -> None:
        await add_events(store, f"ho_{n}", 5)

    # Three handoffs written through A, three through B, all at once.
    await asyncio.gather(*(write(a if n % 2 else b, n) for n in range(6)))
    log = await a.read_events(None, 0, 100)
    assert [e.seq for e in log] == list(range(log[0].seq, log[0].seq + 30))
    assert await feed_a.wait_for(30) == log
    assert await feed_b.wait_for(30) == log
    await asyncio.sleep(0.05)
    assert (len(feed_a.events), len(feed_b.events)) == (30, 30)
    assert feed_a.interruptions == feed_b.interruptions == []


async def test_the_feed_hands_over_only_the_handoffs_followed_here(
    stores: list[RedisStore], settings: RedisSettings
) -> None:
    """Every replica reads every event; it decodes and hands over only those of handoffs
    someone follows on it, and skipping the others is no gap in the feed."""
    store = await open_store(stores, settings)
    got: list[StoredEvent] = []
    interruptions: list[HandoffError] = []
    followed = {"ho_1"}
    store.set_listener(got.extend, interruptions.append, lambda h: h in followed)
    for n in (1, 2):
        await store.create_handoff(sample_handoff(n))
    await add_events(store, "ho_2", 3)
    ours = await add_events(store, "ho_1", 2)
    await until(lambda: len(got) == 2, what="ho_1's events")
    await asyncio.sleep(0.05)
    assert got == ours
    followed.add("ho_2")
    later = await add_events(store, "ho_2", 1)
    await until(lambda: len(got) == 3, what="ho_2's new event")
    assert got[2:] == later
    assert interruptions == []


async def test_a_replica_remembers_the_handoffs_it_used_last_within_its_budget(
    stores: list[RedisStore], settings: RedisSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``last_known`` holds up to RECORDS_CACHED handoffs, the least recently read or written
    forgotten first; a forgotten one is read again (``read_for_webhook``) when next used."""
    monkeypatch.setattr(redis_store, "RECORDS_CACHED", 2)
    store = await open_store(stores, settings)
    for n in (1, 2, 3):
        await store.create_handoff(sample_handoff(n))
    assert [store.last_known(f"ho_{n}") for n in (1, 2, 3)] == [
        None,
        sample_handoff(2),
        sample_handoff(3),
    ]
    read, _, _ = await store.read_for_webhook("ho_1", ["m1"])
    assert read == sample_handoff(1)
    assert [store.last_known(f"ho_{n}") is not None for n in (1, 2, 3)] == [True, False, True]
    ended = dataclasses.replace(
        sample_handoff(3), state=HandoffState.ENDED, end_reason=EndReason.TIMED_OUT
    )
    await store.commit(Commit(ended, 0))
    assert store.last_known("ho_3") == dataclasses.replace(ended, version=1)
    assert store.last_known("ho_1") == sample_handoff(1)


async def test_a_resent_commit_applies_once(settings: RedisSettings) -> None:
    """A commit whose reply was lost is sent again with the same token: nothing doubles."""
    store = await RedisStore.open(settings, make_token=lambda: "same-token")
    try:
        h, _ = await store.create_handoff(sample_handoff(1))
        commit = Commit(h, 0, events=(NewEvent(5, NoAgentAvailable()),), seen_message_ids=("m",))
        first = await store.commit(commit)
        again = await store.commit(commit)
        assert again == first
        assert await store.read_events("ho_1", 0, 10) == first
        current = await store.get_handoff("ho_1")
        assert current is not None
        assert current.version == 1
    finally:
        await store.close()
    # A different commit from the same stale version is refused.
    other = await RedisStore.open(settings)
    try:
        with pytest.raises(ConcurrentUpdate):
            await other.commit(Commit(h, 0, events=(NewEvent(6, NoAgentAvailable()),)))
    finally:
        await other.close()


async def test_commands_sent_together_each_get_their_answer_even_after_scripts_are_lost(
    stores: list[RedisStore], settings: RedisSettings, redis_server: RedisServer
) -> None:
    """A webhook's read and commit go to Redis in a pipeline with the others of the same
    turn of the event loop, each with its own answer; when Redis has lost the scripts (a
    restart without persistence, SCRIPT FLUSH), every command of the turn still lands."""
    store = await open_store(stores, settings)
    for n in range(4):
        await store.create_handoff(sample_handoff(n))
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        for script in (redis_scripts.READ_FOR_WEBHOOK, redis_scripts.COMMIT):
            await raw.script_load(script)  # as a server that ran them before has them
        for lost in (False, True):
            if lost:
                await raw.script_flush()
            reads = await asyncio.gather(
                *(store.read_for_webhook(f"ho_{n}", [f"m{n}"]) for n in range(4))
            )
            current = [handoff for handoff, _, _ in reads]
            assert [h.id if h else None for h in current] == [f"ho_{n}" for n in range(4)]
            assert [(seen, sent) for _, seen, sent in reads] == [(set(), set())] * 4
            commits = [
                Commit(h, h.version, seen_message_ids=(f"m{n}",))
                for n, h in enumerate(current)
                if h is not None
            ]
            stale = Commit(commits[0].handoff, commits[0].expected_version - 1)
            outcomes = await asyncio.gather(
                *(store.commit(c) for c in (*commits, stale)), return_exceptions=True
            )
            assert outcomes[:4] == [[], [], [], []]
            assert isinstance(outcomes[4], ConcurrentUpdate)
            for n in range(4):
                _, seen, _ = await store.read_for_webhook(f"ho_{n}", [f"m{n}"])
                assert seen == {f"m{n}"}
                await raw.srem(f"{settings.prefix}:seen:ho_{n}", f"m{n}")  # for the next round
            if not lost:
                # Four reads at once, then five commits at once, went as two pipelines: on
                # one connection (redis-py's pool opens one per command in flight otherwise).
                pool = store._redis.connection_pool
                assert len(pool._available_connections) + len(pool._in_use_connections) == 1
    finally:
        await raw.aclose()


async def test_commands_sent_together_are_sent_again_when_their_connection_was_lost(
    stores: list[RedisStore], settings: RedisSettings, redis_server: RedisServer
) -> None:
    """Redis closed the connection a turn's commands go on (a restart, a proxy, CLIENT
    KILL): they are written again on a new one, and each still gets its own answer, once."""
    store = await open_store(stores, settings)
    handoffs = [(await store.create_handoff(sample_handoff(n)))[0] for n in range(3)]
    raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        pool = store._redis.connection_pool
        [connection] = pool._available_connections
        assert connection._writer is not None
        host, port = connection._writer.get_extra_info("sockname")[:2]
        assert await raw.client_kill(f"{host}:{port}") is True
        stale = Commit(handoffs[0], 5)
        outcomes = await asyncio.gather(
            *(
                store.commit(Commit(h, 0, events=(NewEvent(1, NoAgentAvailable()),)))
                for h in handoffs
            ),
            store.commit(stale),
            return_exceptions=True,
        )
        assert [type(o) for o in outcomes] == [list, list, list, ConcurrentUpdate]
        for h in handoffs:
            events = await store.read_events(h.id, 0, 10)
            assert [e.payload for e in events] == [NoAgentAvailable()]
            assert (await store.get_handoff(h.id)) == dataclasses.replace(h, version=1)
    finally:
        await raw.aclose()


def test_commands_are_packed_by_hiredis_exactly_as_redis_py_packs_them() -> None:
    """The store's connections pack commands with hiredis (in C) instead of redis-py's
    asyncio code (in Python): the same bytes for every kind of argument the store and
    redis-py send, and the same refusal of what Redis cannot take."""
    store = RedisStore(RedisSettings("redis://127.0.0.1:1"))

    def connection_of(client: aioredis.Redis) -> aioredis.connection.AbstractConnection:
        pool = client.connection_pool
        return pool.connection_class(**pool.connection_kwargs)

    ours, tail = connection_of(store._redis), connection_of(store._tail_redis)
    theirs = aioredis.Connection()
    for connection in (ours, tail):
        assert issubclass(type(connection), redis_store._HiredisPacking)
    commands: list[tuple[Any, ...]] = [
        ("EVALSHA", "a" * 40, 2, "{h}:h:ho_1", "{h}:seen:ho_1", "m1", 17, -3, 10**30),
        ("X", 2.5, 0.1, 1 / 3, 1e20, 1e-7, -0.0, float("inf")),
        ("CLIENT SETINFO", "LIB-NAME", "redis-py"),  # a name of two words goes as two
        (b"CLIENT SETNAME", b"bytes \x00\xff"),
        ("SET", "ключ", "значение ✓", "PX", 10**12),
        ("SET", "k", bytearray(b"ba"), "v", memoryview(b"mv")),
        ("XADD", "k", "*", "payload", "x" * 100_000),  # past redis-py's chunking size
    ]
    for command in commands:
        assert b"".join(ours.pack_command(*command)) == b"".join(theirs.pack_command(*command))
        assert b"".join(ours.pack_commands([command, command])) == b"".join(
            theirs.pack_commands([command, command])
        )
    # What the store sends in its own pipelines (see _Batches), packed by hiredis directly.
    own: list[tuple[str | int, ...]] = [
        ("EVALSHA", "a" * 40, 2, "{h}:h:ho_1", "{h}:seen:ho_1", "m1", 17, -3, 10**30, ""),
        ("EVALSHA", "b" * 40, 1, "ключ", "значение ✓", "x" * 100_000),
    ]
    assert redis_store._packed(own) == b"".join(theirs.pack_commands(own))
    for wrong in (object(), True):
        with pytest.raises(DataError):
            ours.pack_command("SET", "k", cast(Any, wrong))
    with pytest.raises(DataError):
        theirs.pack_command("SET", "k", cast(Any, object()))


async def test_a_cursor_into_trimmed_events_is_refused_and_no_cursor_reads_what_is_left(
    stores: list[RedisStore], settings: RedisSettings
) -> None:
    store = await open_store(stores, settings, stream_maxlen=10, all_stream_maxlen=10)
    await store.create_handoff(sample_handoff(1))
    stored = await add_events(store, "ho_1", 300)
    kept = await store.read_events("ho_1", 0, 1000)
    # MAXLEN ~ trims whole nodes: at least 10 are kept, the oldest are gone.
    assert 10 <= len(kept) < 300
    assert kept == stored[-len(kept) :]
    assert await store.read_events("ho_1", kept[0].seq, 5) == kept[1:6]
    for handoff_id in ("ho_1", None):
        with pytest.raises(CursorExpired, match="trimmed"):
            await store.read_events(handoff_id, stored[0].seq, 5)


async def test_a_handoffs_keys_expire_after_the_retention(
    stores: list[RedisStore], settings: RedisSettings, redis_server: RedisServer
) -> None:
    store = await open_store(stores, settings, retention_s=0.4)
    h, _ = await store.create_handoff(sample_handoff(1))
    ended = dataclasses.replace(h, state=HandoffState.ENDED, end_reason=EndReason.TIMED_OUT)
    await store.commit(
        Commit(
            ended,
            0,
            events=(NewEvent(1, HandoffEnded(EndReason.TIMED_OUT)),),
            seen_message_ids=("seen-1",),
            sent_message_ids=("sent-1",),
            client_message=("c", "b"),
        )
    )
    # Routed once before it expires: the process now remembers hf_1's handoff id, and must
    # still find nothing once the record is gone.
    found = await store.find_by_visitor("hf_1")
    assert found is not None
    assert found.id == "ho_1"
    raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        keys = sorted(str(k) for k in await raw.keys(f"{settings.prefix}:*:ho_1"))
        assert [k.split(":")[1] for k in keys] == ["client", "ev", "h", "seen", "sent"]
        for key in [*keys, f"{settings.prefix}:visitor:hf_1"]:
            assert 0 < await raw.pttl(key) <= 400, key
        await asyncio.sleep(0.5)
        assert await raw.keys(f"{settings.prefix}:*:ho_1") == []
    finally:
        await raw.aclose()
    assert await store.get_handoff("ho_1") is None
    assert await store.read_for_webhook("ho_1", ["seen-1"]) == (None, set(), set())
    assert await store.find_by_visitor("hf_1") is None


async def test_leases_exclude_across_replicas(
    stores: list[RedisStore], settings: RedisSettings
) -> None:
    a = (await open_store(stores, settings)).locks()
    b = (await open_store(stores, settings)).locks()
    inside: list[str] = []
    overlaps: list[tuple[str, ...]] = []

    async def work(locks_name: str, n: int) -> None:
        locks = a if locks_name == "a" else b
        async with locks.hold("send:ho_1"):
            inside.append(f"{locks_name}{n}")
            if len(inside) > 1:
                overlaps.append(tuple(inside))
            await asyncio.sleep(0.002)
            inside.remove(f"{locks_name}{n}")

    await asyncio.gather(*(work(name, n) for n in range(10) for name in ("a", "b")))
    assert overlaps == []


async def test_a_lease_left_by_a_dead_replica_frees_itself(
    stores: list[RedisStore], settings: RedisSettings, redis_server: RedisServer
) -> None:
    store = await open_store(stores, settings)
    raw = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        # A replica took the lease and died: nobody renews it.
        await raw.set(f"{settings.prefix}:lock:send:ho_1", "dead-replica", px=1000)
        quick = store.locks(wait_s=0.1)
        with pytest.raises(ConcurrentUpdate, match="busy on another replica"):
            async with quick.hold("send:ho_1"):
                pass
        patient = store.locks(wait_s=5)
        async with patient.hold("send:ho_1"):
            owner = await raw.get(f"{settings.prefix}:lock:send:ho_1")
            assert owner not in (None, "dead-replica")
        assert await raw.exists(f"{settings.prefix}:lock:send:ho_1") == 0
    finally:
        await raw.aclose()


async def test_a_held_lease_is_renewed_past_its_length(
    stores: list[RedisStore], settings: RedisSettings
) -> None:
    store = await open_store(stores, settings)
    holder, other = (
        store.locks(lease_s=0.9),
        (await open_store(stores, settings)).locks(wait_s=0.05),
    )
    async with holder.hold("send:ho_2"):
        await asyncio.sleep(2.0)  # more than twice the lease
        with pytest.raises(ConcurrentUpdate):
            async with other.hold("send:ho_2"):
                pass


async def wait_ready(store: RedisStore) -> None:
    async def answers() -> bool:
        try:
            await store.ping()
        except StoreUnavailable:
            return False
        return True

    await until(answers, timeout_s=10, what="the store is ready")


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["stop", "crash"])
async def test_redis_going_away_interrupts_and_coming_back_resumes(
    private_redis: RedisServer, how: signal.Signals
) -> None:
    store = await RedisStore.open(RedisSettings(private_redis.url, prefix="{p}"))
    feed = Feed(store)
    try:
        await store.create_handoff(sample_handoff(1))
        before = await add_events(store, "ho_1", 3)
        await feed.wait_for(3)

        private_redis.stop(how)
        await until(lambda: bool(feed.interruptions), what="an interruption")
        assert isinstance(feed.interruptions[0], StoreUnavailable)
        assert "reconnect with after_cursor" in str(feed.interruptions[0])
        for call in (store.get_handoff("ho_1"), store.ping(), store.last_seq()):
            with pytest.raises(StoreUnavailable, match=r"Redis at 127\.0\.0\.1"):
                await call

        private_redis.start()
        await wait_ready(store)
        # Everything acknowledged before is still there, and the feed goes on from it.
        assert await store.read_events("ho_1", 0, 10) == before
        after = await add_events(store, "ho_1", 2)
        assert after[0].seq == before[-1].seq + 1
        assert await feed.wait_for(5) == before + after
    finally:
        await store.close()


async def test_a_redis_that_lost_its_data_is_reported(
    private_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    store = await RedisStore.open(RedisSettings(private_redis.url, prefix="{p}"))
    feed = Feed(store)
    try:
        await store.create_handoff(sample_handoff(1))
        await add_events(store, "ho_1", 3)
        await feed.wait_for(3)
        private_redis.stop(signal.SIGKILL)
        shutil.rmtree(private_redis.folder)  # the disk is gone too
        private_redis.folder.mkdir()
        feed.interruptions.clear()
        with caplog.at_level(logging.ERROR, logger="service.storage.redis_store"):
            private_redis.start()
            await wait_ready(store)
        assert "Redis lost data" in caplog.text
        assert any("restarted" in str(e) for e in feed.interruptions)
        assert await store.last_seq() == 0
    finally:
        await store.close()


async def test_opening_while_redis_is_down_starts_not_ready(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    store = await RedisStore.open(RedisSettings(server.url, prefix="{p}", timeout_s=0.5))
    try:
        with pytest.raises(StoreUnavailable):
            await store.ping()
        server.start()
        await wait_ready(store)
        created, was_created = await store.create_handoff(sample_handoff(1))
        assert was_created
        assert await store.get_handoff("ho_1") == created
    finally:
        await store.close()
        server.stop()


async def test_a_feed_that_fell_behind_the_trimming_says_so(
    stores: list[RedisStore], settings: RedisSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica whose feed stalled (a slow network) while the log was trimmed past it
    interrupts its streams rather than silently skip what it never read."""
    slow = await open_store(stores, settings, all_stream_maxlen=10)
    writer = await open_store(stores, settings, stream_maxlen=10, all_stream_maxlen=10)
    feed = Feed(slow)
    await writer.create_handoff(sample_handoff(1))
    await add_events(writer, "ho_1", 1)
    await feed.wait_for(1)
    network = asyncio.Event()
    real_xread = slow._tail_redis.xread

    async def stalled_xread(*args: object, **kwargs: object) -> object:
        await network.wait()
        return await real_xread(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(slow._tail_redis, "xread", stalled_xread)
    await add_events(writer, "ho_1", 1)  # answers the XREAD already in flight
    await feed.wait_for(2)
    stored = await add_events(writer, "ho_1", 300)  # meanwhile the next XREAD stalls
    assert feed.interruptions == []
    network.set()
    await until(lambda: bool(feed.interruptions), what="the gap is reported")
    assert isinstance(feed.interruptions[0], StreamOverflow)
    assert "trimmed from the log before it read them" in str(feed.interruptions[0])
    # It goes on with what is left, in order, and the clients resume from the log.
    await until(lambda: feed.events[-1] == stored[-1], what="the feed catches up")
    later = feed.events[2:]
    assert later == stored[-len(later) :]


async def test_a_redis_that_stops_answering_times_out_and_recovers(
    private_redis: RedisServer,
) -> None:
    """SIGSTOP: the connection stays open but nothing answers. Every call gives up after
    ``timeout_s``; once Redis answers again, no reply is read out of turn (a connection
    whose command timed out is dropped, not reused). The event feed's blocking read gives
    up too, after its block time and ``timeout_s``: live streams are interrupted, and the feed
    goes on once Redis answers."""
    assert private_redis.process is not None
    store = await RedisStore.open(
        RedisSettings(private_redis.url, prefix="{p}", timeout_s=0.5, tail_block_s=0.2)
    )
    feed = Feed(store)
    try:
        h, _ = await store.create_handoff(sample_handoff(1))
        before = await add_events(store, "ho_1", 2)
        assert await feed.wait_for(2) == before
        private_redis.process.send_signal(signal.SIGSTOP)
        try:
            for call in (
                store.get_handoff("ho_1"),
                store.read_for_webhook("ho_1", ["m1"]),
                store.commit(Commit(h, 2, events=(NewEvent(9, NoAgentAvailable()),))),
            ):
                started = time.monotonic()
                with pytest.raises(StoreUnavailable, match=r"did not answer within 0\.5 s"):
                    await call
                assert time.monotonic() - started < 2.0
            # Three calls of 0.5 s: the feed's read (0.2 + 0.5 s at most) gave up meanwhile.
            assert [type(e) for e in feed.interruptions] == [StoreUnavailable]
            assert "reconnect with after_cursor" in str(feed.interruptions[0])
        finally:
            private_redis.process.send_signal(signal.SIGCONT)
        # The commit may or may not have reached Redis before it stopped: either way each
        # answer now is the answer to its own question.
        stored = await store.get_handoff("ho_1")
        assert stored is not None
        assert stored.id == "ho_1"
        assert stored.version in (2, 3)
        events = await store.read_events("ho_1", 0, 10)
        assert events[:2] == before
        assert [e.payload for e in events[2:]] in ([], [NoAgentAvailable()])
        assert await store.read_for_webhook("ho_1", []) == (stored, set(), set())
        await wait_ready(store)
        after = await add_events(store, "ho_1", 1)
        await until(lambda: feed.events[-1:] == after, what="the feed going on")
        assert feed.events == events + after
    finally:
        await store.close()


def test_commit_tokens_never_repeat_in_a_process_nor_across_processes() -> None:
    """A token names a commit so that a resend applies once: two commits must never share
    one. Each process draws a random prefix, then counts."""
    tokens = [redis_store._commit_token() for _ in range(10_000)]
    assert len(set(tokens)) == len(tokens)
    others = subprocess.run(
        [
            sys.executable,
            "-c",
            "from service.storage.redis_store import _commit_token; print(_commit_token())",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert len(others) == 1
    assert others[0].split(".")[0] != tokens[0].split(".")[0]
    assert len(tokens[0].split(".")[0]) == 24  # 12 random bytes
