"""The shared store: Redis, so that several replicas serve the same handoffs.

Keys (``p`` is the prefix, a hash tag such as ``{handoff}`` so that Redis Cluster keeps
every key on one slot, which the Lua scripts in ``redis_scripts`` need):

    p:seq                  counter: the position of the newest event
    p:events               stream of every event; entry id ``0-<position>``; MAXLEN ~
    p:ev:<handoff>         stream of one handoff's events, with the same entry ids
    p:h:<handoff>          hash: rec (the Handoff as JSON), v (version), lc/ls (last commit)
    p:conv:<conversation>  the open handoff of a bot conversation (deleted when it ends)
    p:visitor:<visitor>    the handoff of a Brevo visitor id
    p:bconv:<chat>         "<created_at_ms>:<handoff>", the newest handoff in a Brevo chat
    p:pending              sorted set of handoffs waiting for an agent, by created_at_ms
    p:held                 sorted set of handoffs holding agent messages (the reorder
                           window), by when the next one is due
    p:seen:<handoff>       Brevo message ids already handled
    p:sent:<handoff>       Brevo message ids the service posted itself (echo suppression)
    p:client:<handoff>     client_message_id -> Brevo message id
    p:lock:<key>           leases, see ``redis_locks``

A handoff's keys expire ``retention_s`` after its last change. Cursors name stream
entries: ``c1.<n>`` resumes after entry ``0-<n>``. Each process tails ``p:events`` with a
blocking XREAD (no consumer group: every replica must see every event) and hands what it
reads to the listener, including the events it committed itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.commands.core import AsyncScript
from redis.connection import HiredisRespSerializer
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from service.core.codec import (
    handoff_from_json,
    handoff_to_json,
    payload_from_json,
    payload_to_json,
)
from service.core.errors import ConcurrentUpdate, CursorExpired, StoreUnavailable, StreamOverflow
from service.core.models import Commit, Handoff, HandoffState, StoredEvent, WebhookRead
from service.core.ports import EventListener, InterruptListener, WantsHandoff
from service.storage import redis_scripts
from service.storage.redis_locks import RedisLocks

log = logging.getLogger(__name__)

T = TypeVar("T")

TAIL_BATCH = 1000
VISITOR_CACHE_SIZE = 100_000  # routes remembered per process (about 20 MiB at most)
RECORDS_CACHED = 10_000  # handoffs remembered per process for last_known (see there)


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str
    prefix: str = "{handoff}"
    retention_s: float = 7 * 24 * 3600
    stream_maxlen: int = 10_000
    all_stream_maxlen: int = 100_000
    timeout_s: float = 5.0
    tail_block_s: float = 2.0


class _HiredisPacking:
    """Commands packed by hiredis, in C, with redis-py's own ``HiredisRespSerializer``: what
    its synchronous client does when hiredis is installed. Its asyncio connections pack in
    Python, an argument at a time, which was a seventh of a webhook's CPU on Redis (py-spy,
    make bench's ingest load)."""

    def pack_command(self, *args: Any) -> list[bytes]:
        packed: list[bytes] = _HIREDIS_SERIALIZER.pack(*args)
        return packed


_HIREDIS_SERIALIZER = HiredisRespSerializer()


def _packed_by_hiredis(client: aioredis.Redis) -> aioredis.Redis:
    """``client``, its connections (none made yet) packing commands with hiredis."""
    pool = client.connection_pool
    base = pool.connection_class
    pool.connection_class = cast(
        type[AbstractConnection],
        type(base.__name__, (_HiredisPacking, base), {}),
    )
    return client


class _Batches:
    """Commands issued in one turn of the event loop go to Redis as one pipeline: one write
    and one round trip for them all, where each had its own (the socket writes alone were a
    sixth of a webhook's CPU on Redis, py-spy under make bench's load). Each command still
    gets its own reply or error; a pipeline that fails fails each of its commands."""

    def __init__(self, redis: aioredis.Redis, timeout_s: float) -> None:
        self._redis = redis
        self._timeout_s = timeout_s
        self._queued: list[tuple[tuple[str | int, ...], asyncio.Future[Any]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def send(self, *command: str | int) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._queued:
            # The task's first step comes after everything else ready in this turn, so the
            # commands issued meanwhile go with this one.
            task = loop.create_task(self._send())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._queued.append((command, future))
        return future

    async def _send(self) -> None:
        batch, self._queued = self._queued, []
        try:
            # Bounded like every command (see _call): redis-py drops the connection of a
            # pipeline cancelled mid-way, so no reply is ever read out of turn.
            async with asyncio.timeout(self._timeout_s):
                replies = await self._round_trip([command for command, _ in batch])
        except (RedisError, TimeoutError) as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException as exc:  # cancelled (the store closing), or a defect
            for _, future in batch:
                if not future.done():
                    future.set_exception(RedisConnectionError(f"pipeline not sent: {exc!r}"))
            raise
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():  # its caller gave up waiting
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _round_trip(self, commands: list[tuple[str | int, ...]]) -> list[Any]:
        """Writes ``commands`` at once on one connection and reads their replies, an error
        reply in place of its command's: what redis-py's pipeline does (resent whole on a
        lost connection, as its retry policy says), without its bookkeeping for every
        command, which cost more than the round trip (py-spy, make bench's ingest load)."""
        pool = self._redis.connection_pool
        get_connection: Callable[[], Awaitable[AbstractConnection]] = pool.get_connection
        connection = await get_connection()
        packed = _packed(commands)

        async def once() -> list[Any]:
            await connection.send_packed_command(packed)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as error:  # NoScriptError among them
                    replies.append(error)
            return replies

        async def drop(error: Exception) -> None:
            await connection.disconnect()

        try:
            replies: list[Any] = await connection.retry.call_with_retry(once, drop)
        finally:
            await pool.release(connection)
        return replies

    async def wait_sent(self) -> None:
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _packed(commands: list[tuple[str | int, ...]]) -> bytes:
    """``commands`` in Redis' protocol, packed by hiredis directly: the store's own commands
    (a one-word name, str and int arguments) need none of what redis-py's packer does to
    each argument first, which was two thirds of the time it took to pack a commit (timeit)."""
    pack = cast(Callable[[tuple[str | int, ...]], bytes], hiredis.pack_command)
    return b"".join([pack(command) for command in commands])


_TOKEN_PREFIX = secrets.token_hex(12)  # this process's, drawn once
_token_counter = itertools.count()


def _commit_token() -> str:
    """Unique across processes and time: a random prefix per process, then a counter (a
    fresh random token per commit showed in profiles)."""
    return f"{_TOKEN_PREFIX}.{next(_token_counter)}"


def describe_url(url: str) -> str:
    """``host:port/db`` of a Redis URL: safe to log (no user name, no password)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return f"unix:{parts.path}"
    db = parts.path.lstrip("/") or "0"
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}/{db}"


class RedisStore:
    """HandoffStore on Redis. Open it with ``await RedisStore.open(settings)``.

    Opening never fails because Redis is down: calls raise StoreUnavailable until it
    answers, and ``ping`` says whether this process is ready.
    """

    def __init__(
        self, settings: RedisSettings, make_token: Callable[[], str] = _commit_token
    ) -> None:
        self._settings = settings
        self._make_token = make_token
        self._where = describe_url(settings.url)
        self._retention_ms = str(int(settings.retention_s * 1000))
        p = settings.prefix
        self._seq_key = f"{p}:seq"
        self._events_key = f"{p}:events"
        self._pending_key = f"{p}:pending"
        self._held_key = f"{p}:held"
        # Visitor id -> handoff id never changes once created (the service makes a new
        # visitor id for each handoff), so each process remembers the newest ones: a
        # webhook's routing then costs no round trip (its commit is its one, see last_known).
        self._handoff_of_visitor: OrderedDict[str, str] = OrderedDict()
        # The handoffs this process last read or wrote, newest last: what last_known
        # offers, for a webhook planned on it and committed by commit_if_new.
        self._records: OrderedDict[str, Handoff] = OrderedDict()
        # Few, quick retries: a caller must learn soon that Redis is gone. Commits are safe
        # to resend (each carries a token the COMMIT script recognises).
        # No socket_timeout: redis-py then wraps every send in asyncio.wait_for, a task per
        # command (a tenth of a webhook's CPU in a py-spy profile under make bench's load).
        # Every command goes through _call instead, which bounds it with asyncio.timeout;
        # redis-py drops a connection whose command was cancelled, so no reply is ever read
        # out of turn.
        self._redis = _packed_by_hiredis(
            aioredis.Redis.from_url(
                settings.url,
                decode_responses=True,
                socket_timeout=None,  # (redis-py's default is 5 s)
                socket_connect_timeout=settings.timeout_s,
                retry=Retry(ExponentialWithJitterBackoff(base=0.02, cap=0.2), 2),
            )
        )
        # The tail blocks in XREAD; it gets its own connection and does its own retrying, and
        # bounds its commands itself too (see _tail).
        self._tail_redis = _packed_by_hiredis(
            aioredis.Redis.from_url(
                settings.url,
                decode_responses=True,
                socket_timeout=None,
                socket_connect_timeout=settings.timeout_s,
                retry=Retry(NoBackoff(), 0),
            )
        )
        self._create = self._redis.register_script(redis_scripts.CREATE)
        self._release_conversation = self._redis.register_script(redis_scripts.RELEASE_CONVERSATION)
        self._commit = self._redis.register_script(redis_scripts.COMMIT)
        self._read_for_webhook = self._redis.register_script(redis_scripts.READ_FOR_WEBHOOK)
        self._batches = _Batches(self._redis, settings.timeout_s)
        self._listener: EventListener | None = None
        self._on_interrupt: InterruptListener | None = None
        self._wants: WantsHandoff | None = None
        self._tail_task: asyncio.Task[None] | None = None
        self._feed_connected = False
        self._feed_ready = asyncio.Event()
        self._closed = False
        # Commands in flight: close() lets them finish first, because a command that meets a
        # closed connection pool reconnects and would leave a connection open.
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @classmethod
    async def open(
        cls, settings: RedisSettings, *, make_token: Callable[[], str] = _commit_token
    ) -> RedisStore:
        """``make_token`` names each commit, so that a resent commit is recognised."""
        store = cls(settings, make_token)
        try:
            async with asyncio.timeout(settings.timeout_s):
                await store._check_server()
        except (RedisError, TimeoutError) as exc:
            log.warning(
                "Redis at %s is not answering yet (%s); not ready until it does",
                store._where,
                str(exc) or type(exc).__name__,
            )
            reachable = False
        else:
            reachable = True
        store._tail_task = asyncio.create_task(store._tail(), name="redis-event-tail")
        if reachable:  # be ready on return, unless Redis went away meanwhile
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(store._feed_ready.wait(), settings.timeout_s)
        return store

    async def _check_server(self) -> None:
        info = await self._redis.info("server")
        version = str(info.get("redis_version", "0"))
        if tuple(int(x) for x in version.split(".")[:2] if x.isdigit()) < (6, 2):
            log.error(
                "Redis %s at %s is too old: the handoff service needs 6.2 or newer",
                version,
                self._where,
            )
        persistence = await self._redis.info("persistence")
        if not int(persistence.get("aof_enabled", 0)):
            log.warning(
                "Redis at %s keeps no append-only file: if Redis restarts, handoffs and "
                "events written since its last snapshot are lost (set appendonly yes)",
                self._where,
            )

    def locks(self, lease_s: float = 10.0, wait_s: float = 30.0) -> RedisLocks:
        """Leases on this Redis: mutual exclusion across every replica sharing it."""
        return RedisLocks(self._redis, self._settings.prefix, self._call, lease_s, wait_s)

    def set_listener(
        self,
        listener: EventListener,
        on_interrupt: InterruptListener,
        wants: WantsHandoff | None = None,
    ) -> None:
        """``wants``: the feed decodes and hands over only the events of handoffs it wants
        (every replica reads every event; mostly another replica holds the stream)."""
        self._listener = listener
        self._on_interrupt = on_interrupt
        self._wants = wants

    async def _call(self, what: str, op: Awaitable[T], *, bounded: bool = False) -> T:
        """Every command goes through here: Redis errors become StoreUnavailable.
        ``bounded``: ``op`` times out by itself (a pipeline of ``_Batches``), so no timer of
        its own here."""
        if self._closed:
            if asyncio.iscoroutine(op):
                op.close()
            raise StoreUnavailable("the store is closed")
        self._in_flight += 1
        self._idle.clear()
        try:
            if bounded:
                return await op
            async with asyncio.timeout(self._settings.timeout_s):
                return await op
        except RedisError as exc:
            raise StoreUnavailable(
                f"Redis at {self._where} failed to {what}: {type(exc).__name__}: {exc} "
                "(retry with backoff)"
            ) from exc
        except TimeoutError:
            raise StoreUnavailable(
                f"Redis at {self._where} did not answer within {self._settings.timeout_s:g} s "
                f"to {what} (retry with backoff)"
            ) from None
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _batched(
        self, script: AsyncScript, keys: list[str], args: Sequence[str | int]
    ) -> Any:
        """``script`` run in this turn's pipeline (see _Batches); loaded first if Redis lost
        it (a restart without persistence, SCRIPT FLUSH). Times out by itself."""
        try:
            return await self._batches.send("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            async with asyncio.timeout(self._settings.timeout_s):
                return await script(keys=keys, args=args)

    # --- keys -----------------------------------------------------------------------------

    def _k(self, kind: str, name: str) -> str:
        return f"{self._settings.prefix}:{kind}:{name}"

    # --- handoffs -------------------------------------------------------------------------

    async def create_handoff(self, handoff: Handoff) -> tuple[Handoff, bool]:
        for _ in range(3):
            owner = await self._call(
                "create a handoff",
                self._create(
                    keys=[
                        self._k("conv", handoff.conversation_id),
                        self._k("h", handoff.id),
                        self._k("visitor", handoff.visitor_id),
                        self._pending_key,
                    ],
                    args=[
                        handoff.id,
                        handoff_to_json(handoff),
                        handoff.version,
                        handoff.created_at_ms,
                        self._retention_ms,
                        "1" if handoff.state is HandoffState.PENDING_AGENT else "0",
                    ],
                ),
            )
            if owner == handoff.id:
                return self._remember(handoff), True
            existing = await self.get_handoff(str(owner))
            if existing is not None and existing.is_open:
                return existing, False
            # The pointer outlived its handoff (expired): clear it and try again.
            await self._call(
                "release a conversation",
                self._release_conversation(
                    keys=[self._k("conv", handoff.conversation_id)], args=[str(owner)]
                ),
            )
        raise StoreUnavailable(f"conversation {handoff.conversation_id} kept changing; retry")

    async def get_handoff(self, handoff_id: str) -> Handoff | None:
        record = await self._call(
            "read a handoff", self._redis.hget(self._k("h", handoff_id), "rec")
        )
        return self._remember(handoff_from_json(str(record))) if record else None

    def _remember(self, handoff: Handoff) -> Handoff:
        records = self._records
        records[handoff.id] = handoff
        records.move_to_end(handoff.id)
        if len(records) > RECORDS_CACHED:
            records.popitem(last=False)
        return handoff

    def last_known(self, handoff_id: str) -> Handoff | None:
        """The record as this process last read or wrote it. Another replica may have
        committed since: commit_if_new then answers with the record Redis holds."""
        return self._records.get(handoff_id)

    async def _by_pointer(self, key: str) -> Handoff | None:
        handoff_id = await self._call("read an index", self._redis.get(key))
        return await self.get_handoff(str(handoff_id)) if handoff_id else None

    async def find_open_by_conversation(self, conversation_id: str) -> Handoff | None:
        found = await self._by_pointer(self._k("conv", conversation_id))
        return found if found is not None and found.is_open else None

    async def find_by_visitor(self, visitor_id: str) -> Handoff | None:
        handoff_id = await self.handoff_id_of_visitor(visitor_id)
        return await self.get_handoff(handoff_id) if handoff_id is not None else None

    async def handoff_id_of_visitor(self, visitor_id: str) -> str | None:
        handoff_id = self._handoff_of_visitor.get(visitor_id)
        if handoff_id is None:
            found = await self._call(
                "read an index", self._redis.get(self._k("visitor", visitor_id))
            )
            if not found:
                return None
            handoff_id = str(found)
            self._handoff_of_visitor[visitor_id] = handoff_id
            if len(self._handoff_of_visitor) > VISITOR_CACHE_SIZE:
                self._handoff_of_visitor.popitem(last=False)
        return handoff_id

    async def find_by_brevo_conversation(self, brevo_conversation_id: str) -> Handoff | None:
        newest = await self._call(
            "read an index", self._redis.get(self._k("bconv", brevo_conversation_id))
        )
        if not newest:
            return None
        return await self.get_handoff(str(newest).split(":", 1)[1])

    async def pending_before(self, created_before_ms: int) -> list[Handoff]:
        found = await self._indexed(self._pending_key, f"({created_before_ms}", "pending")
        return [h for h in found if h.state is HandoffState.PENDING_AGENT]

    async def held_due(self, release_before_ms: int) -> list[Handoff]:
        found = await self._indexed(self._held_key, str(release_before_ms), "held")
        return [h for h in found if h.held]

    async def _indexed(self, index: str, max_score: str, what: str) -> list[Handoff]:
        """The handoffs a sorted-set index lists up to ``max_score``, in score order;
        members whose record expired are pruned from the index."""
        ids = [
            str(i)
            for i in await self._call(
                f"list {what} handoffs", self._redis.zrangebyscore(index, "-inf", max_score)
            )
        ]
        if not ids:
            return []
        records = await self._call(
            "read handoffs",
            _gather_hget(self._redis, [self._k("h", i) for i in ids], "rec"),
        )
        found: list[Handoff] = []
        gone: list[str] = []
        for handoff_id, record in zip(ids, records, strict=True):
            if record is None:
                gone.append(handoff_id)  # expired: forget it
            else:
                found.append(handoff_from_json(record))
        if gone:
            await self._call(f"prune {what} handoffs", self._redis.zrem(index, *gone))
        return found

    # --- the one write path ---------------------------------------------------------------

    async def commit(self, commit: Commit) -> list[StoredEvent]:
        reply = await self._run_commit(commit, ())
        if reply[0] not in ("ok", "done"):  # stale or missing
            self._records.pop(commit.handoff.id, None)
            raise ConcurrentUpdate(f"handoff {commit.handoff.id} changed since it was read")
        return self._stored(commit, reply)

    async def commit_if_new(
        self, commit: Commit, message_ids: Sequence[str]
    ) -> list[StoredEvent] | WebhookRead:
        """One round trip: the COMMIT script checks the ids too, and answers a refusal with
        the record and the ids' flags (what read_for_webhook reads)."""
        unique = list(dict.fromkeys(message_ids))
        reply = await self._run_commit(commit, unique)
        if reply[0] in ("ok", "done"):
            return self._stored(commit, reply)
        # {'stale', record, seen, sent} or {'missing'}: READ_FOR_WEBHOOK's answers.
        return self._webhook_read(commit.handoff.id, unique, reply[1:])

    async def _run_commit(self, commit: Commit, new_ids: Sequence[str]) -> list[Any]:
        """The COMMIT script on ``commit``, refused unless the version holds and none of
        ``new_ids`` is seen or sent (see redis_scripts.COMMIT for its answers)."""
        h = commit.handoff
        new_version = commit.expected_version + 1
        args: list[str | int] = [
            commit.expected_version,
            new_version,
            handoff_to_json(h, version=new_version),
            h.state.value,
            h.id,
            h.created_at_ms,
            h.brevo_conversation_id,
            self._make_token(),
            self._retention_ms,
            self._settings.stream_maxlen,
            self._settings.all_stream_maxlen,
            h.conversation_id,
            "" if h.next_release_ms is None else h.next_release_ms,
            len(commit.events),
        ]
        args += [len(new_ids), *new_ids]
        for event in commit.events:
            args += [event.occurred_at_ms, event.received_at_ms, payload_to_json(event.payload)]
        args += [len(commit.seen_message_ids), *commit.seen_message_ids]
        args += [len(commit.sent_message_ids), *commit.sent_message_ids]
        args += list(commit.client_message) if commit.client_message else ["", ""]
        return await self._call(
            "commit a change",
            self._batched(
                self._commit,
                [
                    self._k("h", h.id),
                    self._k("conv", h.conversation_id),
                    self._k("visitor", h.visitor_id),
                    self._k("bconv", h.brevo_conversation_id),
                    self._pending_key,
                    self._k("seen", h.id),
                    self._k("sent", h.id),
                    self._k("client", h.id),
                    self._k("ev", h.id),
                    self._events_key,
                    self._seq_key,
                    self._held_key,
                ],
                args,
            ),
            bounded=True,
        )

    def _stored(self, commit: Commit, reply: list[Any]) -> list[StoredEvent]:
        h = commit.handoff
        self._remember(h.at_version(commit.expected_version + 1))
        seqs = [int(s) for s in str(reply[1]).split(",") if s]
        return [event.stored(seq, h) for seq, event in zip(seqs, commit.events, strict=True)]

    # --- message ids ----------------------------------------------------------------------

    async def read_for_webhook(self, handoff_id: str, message_ids: Sequence[str]) -> WebhookRead:
        unique = list(dict.fromkeys(message_ids))
        replies: list[Any] = await self._call(
            "read a handoff and message ids",
            self._batched(
                self._read_for_webhook,
                [
                    self._k("h", handoff_id),
                    self._k("seen", handoff_id),
                    self._k("sent", handoff_id),
                ],
                unique,
            ),
            bounded=True,
        )
        return self._webhook_read(handoff_id, unique, replies)

    def _webhook_read(self, handoff_id: str, unique: list[str], replies: list[Any]) -> WebhookRead:
        """READ_FOR_WEBHOOK's answer (COMMIT's refusal, its status taken off): {record or
        nil}, nothing, or {record, seen flags, sent flags}, a flag for each of ``unique``."""
        if not replies or not replies[0]:
            self._records.pop(handoff_id, None)
            return WebhookRead(None, set(), set())
        handoff = self._remember(handoff_from_json(str(replies[0])))
        if len(replies) < 3:
            return WebhookRead(handoff, set(), set())
        return WebhookRead(
            handoff,
            {m for m, known in zip(unique, replies[1], strict=True) if known},
            {m for m, known in zip(unique, replies[2], strict=True) if known},
        )

    async def client_message(self, handoff_id: str, client_message_id: str) -> str | None:
        found = await self._call(
            "read a client message id",
            self._redis.hget(self._k("client", handoff_id), client_message_id),
        )
        return str(found) if found is not None else None

    # --- the event log --------------------------------------------------------------------

    async def read_events(
        self, handoff_id: str | None, after_seq: int, limit: int
    ) -> list[StoredEvent]:
        key = self._events_key if handoff_id is None else self._k("ev", handoff_id)
        start = f"(0-{after_seq}" if after_seq > 0 else "-"
        entries = await self._call("read events", self._redis.xrange(key, start, "+", count=limit))
        read = [_entry(str(entry_id), fields) for entry_id, fields in entries or ()]
        if after_seq > 0 and read:
            # Trimming removes the oldest entries, never all: had events after the cursor
            # been trimmed, the first one left would follow one of them, not the cursor.
            first, previous_in_handoff = read[0]
            previous = first.seq - 1 if handoff_id is None else previous_in_handoff
            if previous > after_seq:
                raise CursorExpired(
                    f"events after position {after_seq} were trimmed from the log "
                    "(REDIS_STREAM_MAXLEN); reconnect without after_cursor"
                )
        return [event for event, _ in read]

    async def last_seq(self) -> int:
        value = await self._call("read the log position", self._redis.get(self._seq_key))
        return int(value) if value else 0

    # --- the live feed --------------------------------------------------------------------

    async def _tail(self) -> None:
        """Reads every new event of the deployment and hands it to the listener, forever."""
        last: int | None = None  # None: the feed has not started yet
        reported_down = False
        delay = 0.05
        while not self._closed:
            try:
                if not self._feed_connected:
                    async with asyncio.timeout(self._settings.timeout_s):
                        last = await self._resume_point(last)
                assert last is not None
                if self._closed:
                    return
                # Bounded here rather than by a socket timeout, which redis-py applies to
                # each send through asyncio.wait_for: a task per read of the feed.
                async with asyncio.timeout(self._settings.tail_block_s + self._settings.timeout_s):
                    reply = await self._tail_redis.xread(
                        {self._events_key: f"0-{last}"},
                        count=TAIL_BATCH,
                        block=int(self._settings.tail_block_s * 1000),
                    )
            except (RedisError, TimeoutError) as exc:
                if self._closed:
                    return
                if self._feed_connected or not reported_down:
                    log.warning(
                        "no event feed from Redis at %s (%s); live streams on this replica "
                        "end with UNAVAILABLE until it is back",
                        self._where,
                        type(exc).__name__,
                    )
                    self._interrupt(
                        StoreUnavailable(
                            f"this replica lost Redis at {self._where}; reconnect with "
                            "after_cursor set to the last cursor received"
                        )
                    )
                self._feed_connected = False
                reported_down = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            reported_down = False
            delay = 0.05
            if not reply:
                continue
            entries = _xread_entries(reply)
            if _position(entries[0][0]) != last + 1:
                self._interrupt(
                    StreamOverflow(
                        "this replica missed events that were trimmed from the log before it "
                        "read them; reconnect with after_cursor set to the last cursor received"
                    )
                )
            last = _position(entries[-1][0])
            if self._listener is not None:
                wants = self._wants
                events = [
                    _entry(entry_id, fields)[0]
                    for entry_id, fields in entries
                    if wants is None or wants(_handoff_of(fields))
                ]
                if events:
                    self._listener(events)

    async def _resume_point(self, last: int | None) -> int:
        """Where the feed goes on after (re)connecting: its old place, unless the log moved."""
        if self._closed:
            raise RedisConnectionError("the store is closed")
        newest_raw = await self._tail_redis.get(self._seq_key)
        newest = int(newest_raw) if newest_raw else 0
        if last is None or newest < last:
            if last is not None:
                log.error(
                    "the event log in Redis at %s restarted from position %d (this replica "
                    "had read up to %d): Redis lost data; clients must reconnect without a cursor",
                    self._where,
                    newest,
                    last,
                )
            # Streams opened before the feed started may have read the store before this
            # position was taken: make them re-read from the log.
            self._interrupt(
                StoreUnavailable("the event feed restarted; reconnect with your last cursor")
            )
            last = newest
        log.info("event feed from Redis at %s is live after position %d", self._where, last)
        self._feed_connected = True
        self._feed_ready.set()
        return last

    def _interrupt(self, error: StoreUnavailable | StreamOverflow) -> None:
        if self._on_interrupt is not None:
            self._on_interrupt(error)

    # --- health and shutdown --------------------------------------------------------------

    async def ping(self) -> None:
        await self._call("answer PING", self._redis.ping())
        if not self._feed_connected:
            raise StoreUnavailable(f"the event feed from Redis at {self._where} is reconnecting")

    async def close(self) -> None:
        """Stops the feed and closes the connections; closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        # redis-py lets a command finish even when its task is cancelled, so a blocked XREAD
        # would hold on for its whole BLOCK time: cut its connection instead. The feed sees
        # the store closed before each command and stops by itself.
        await self._tail_redis.aclose()
        if self._tail_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._tail_task), self._settings.timeout_s)
            except TimeoutError:
                self._tail_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._tail_task
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self._settings.timeout_s)
        await self._batches.wait_sent()  # each bounded by timeout_s
        await self._redis.aclose()


async def _gather_hget(client: aioredis.Redis, keys: list[str], field: str) -> list[str | None]:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.hget(key, field)
    return list(await pipe.execute())


def _xread_entries(reply: object) -> list[tuple[str, object]]:
    """The entries of a one-stream XREAD reply: [[stream, [(id, fields), ...]]]."""
    assert isinstance(reply, list)
    assert len(reply) == 1
    _, entries = reply[0]
    return [(str(entry_id), fields) for entry_id, fields in entries]


def _position(entry_id: str) -> int:
    return int(entry_id.rsplit("-", 1)[1])


def _handoff_of(fields: object) -> str:
    assert isinstance(fields, dict)
    return str(fields["h"])


def _entry(entry_id: str, fields: object) -> tuple[StoredEvent, int]:
    """A stream entry: its event, and the position of the handoff's previous event."""
    assert isinstance(fields, dict)
    values = {str(k): str(v) for k, v in fields.items()}
    event = StoredEvent(
        seq=_position(entry_id),
        handoff_id=values["h"],
        conversation_id=values["c"],
        occurred_at_ms=int(values["t"]),
        payload=payload_from_json(values["p"]),
        received_at_ms=int(values.get("r", "0")),
    )
    return event, int(values.get("q", "0"))
