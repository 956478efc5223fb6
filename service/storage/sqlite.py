"""The embedded store: one SQLite file in WAL mode.

Writes are serialised on one connection, so the event log's order is the commit order, and
committed events are handed to the listener on the event loop in that same order.

Where that connection runs depends on the synchronous mode. With NORMAL (the default) a
commit appends to the write-ahead log without waiting for the disk, and a statement takes
tens of microseconds: the store runs them on the event loop itself, since a hop to a thread
and back costs more CPU than the statements do. Reads that can be long (a
stream's replay, the sweeps) go to a second, read-only connection on a thread of its own,
so that they never hold the loop. With FULL or EXTRA every commit waits for the disk, and
the writing connection runs on that thread too.

Checkpoints (copying the write-ahead log into the file, and syncing it) run on that thread
too, not in the commit that happens to fill the log: there, each held the event loop for
milliseconds, every few hundred commits.

Commits made in one turn of the event loop share a transaction (a group commit), and
handoff records stay in memory once read or written, with the message ids of their handoff
while those are few: one process uses a file at a time.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import fcntl
import functools
import logging
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Self, TypeVar

from service.core.codec import (
    handoff_from_json,
    handoff_to_json,
    payload_from_json,
    payload_to_json,
)
from service.core.errors import ConcurrentUpdate, StoreUnavailable
from service.core.models import (
    AgentMessage,
    Commit,
    Handoff,
    HandoffState,
    StoredEvent,
    WebhookRead,
)
from service.core.ports import EventListener, InterruptListener, WantsHandoff
from service.storage.known_ids import KnownIds

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS handoffs (
    id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL,
    visitor_id TEXT NOT NULL UNIQUE,
    brevo_conversation_id TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    version INTEGER NOT NULL,
    record TEXT NOT NULL,
    release_at_ms INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS handoffs_open_conversation
    ON handoffs (conversation_id) WHERE state != 'ENDED';
CREATE INDEX IF NOT EXISTS handoffs_brevo_conversation
    ON handoffs (brevo_conversation_id, created_at_ms);
CREATE INDEX IF NOT EXISTS handoffs_pending
    ON handoffs (created_at_ms) WHERE state = 'PENDING_AGENT';
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    handoff_id TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    occurred_at_ms INTEGER NOT NULL,
    payload TEXT NOT NULL,
    received_at_ms INTEGER NOT NULL DEFAULT 0,
    message_id TEXT
);
CREATE TABLE IF NOT EXISTS seen_messages (
    handoff_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    PRIMARY KEY (handoff_id, message_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS sent_messages (
    handoff_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    PRIMARY KEY (handoff_id, message_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS client_messages (
    handoff_id TEXT NOT NULL,
    client_message_id TEXT NOT NULL,
    brevo_message_id TEXT NOT NULL,
    PRIMARY KEY (handoff_id, client_message_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS handoff_events (
    handoff_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    message_id TEXT,
    PRIMARY KEY (handoff_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS store_state (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT OR IGNORE INTO store_state VALUES ('handoff_events_through', 0);
"""

# A handoff's events, in order, with their message ids: what a stream's replay and the loading
# of a handoff's ids read. An index on events (handoff_id, seq, message_id) kept that, one
# entry a webhook, each handoff's on a page of its own: every webhook wrote one page more to
# the log than its event's (the events' own pages fill in turn), a tenth of the service's
# ingest (scratch runs of section 2's load on 2026-12-03, without the index against with it,
# three turns: 12,600 to 12,860 webhooks a second against 11,390 to 11,790). The same entries
# now go to handoff_events in bulk, every INDEX_EVERY events stored, those after the last
# bulk copy (store_state's handoff_events_through, moved in the same transaction) found by
# scanning the newest events by seq. Every read below takes both, in one statement, so in one
# snapshot of the file: the two never overlap and leave nothing out.
_THROUGH = "SELECT value FROM store_state WHERE key = 'handoff_events_through'"
_MOVE_THROUGH = "UPDATE store_state SET value = ? WHERE key = 'handoff_events_through'"
_INDEX_TAIL = (
    "INSERT OR IGNORE INTO handoff_events (handoff_id, seq, message_id)"
    " SELECT handoff_id, seq, message_id FROM events WHERE seq > ? AND seq <= ?"
)
INDEX_EVERY = 500

# Every write of a handoff checks and bumps its version. Setting an indexed column makes
# SQLite rewrite that entry of each index on it (four, with the partial ones), even to the same
# value: a commit that changes none of them sets only what it changes.
_UPDATE_ALL = (
    "UPDATE handoffs SET state = ?, brevo_conversation_id = ?, version = ?, record = ?,"
    " release_at_ms = ? WHERE id = ? AND version = ?"
)
_UPDATE_RECORD = "UPDATE handoffs SET version = ?, record = ? WHERE id = ? AND version = ?"
# A commit that leaves the record as it was (the usual webhook) moves its version on: the
# record's text stays, and the ``version`` column is what a read takes (the text's own
# version field may then lag behind it; it is never read). Encoding the record was a tenth
# of a webhook's own work. With statements on the event loop, even the version column waits
# (see SqliteStore._lagging).
_UPDATE_VERSION = "UPDATE handoffs SET version = ? WHERE id = ? AND version = ?"
# Every read of a record: its text and its version.
_RECORD = "SELECT record, version FROM handoffs"
# The message ids kept for a handoff, as (0, id) when seen, (1, id) when sent: those of
# messages dropped or held in seen_messages, those of agent messages with their events (see
# _apply: in handoff_events, and the newest events not yet copied there), those the service
# posted in sent_messages: _SEEN_IDS the first three places, _SENT_IDS the fourth, _KEPT_IDS
# all four. Each place takes the handoff id (then the parameters of ``also``, a further
# condition on message_id) once.
# (S608: what is joined in is this module's own constants, never input.)
_SEEN_IDS = (
    "SELECT 0, message_id FROM seen_messages WHERE handoff_id = ?{also} UNION ALL"  # noqa: S608
    " SELECT 0, message_id FROM handoff_events"
    " WHERE handoff_id = ? AND message_id IS NOT NULL{also} UNION ALL"
    " SELECT 0, message_id FROM events WHERE seq > (" + _THROUGH + ")"
    " AND handoff_id = ? AND message_id IS NOT NULL{also}"
)
_SENT_IDS = "SELECT 1, message_id FROM sent_messages WHERE handoff_id = ?{also}"
_KEPT_IDS = _SEEN_IDS + " UNION ALL " + _SENT_IDS

_READ_ALL_EVENTS = (
    "SELECT seq, handoff_id, conversation_id, occurred_at_ms, payload, received_at_ms"
    " FROM events WHERE seq > ? ORDER BY seq LIMIT ?"
)
_READ_HANDOFF_EVENTS = (
    "SELECT seq, handoff_id, conversation_id, occurred_at_ms, payload, received_at_ms"  # noqa: S608
    " FROM events WHERE seq IN (SELECT seq FROM handoff_events"
    " WHERE handoff_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3) UNION ALL"
    " SELECT seq, handoff_id, conversation_id, occurred_at_ms, payload, received_at_ms"
    " FROM events WHERE seq > MAX(?2, (" + _THROUGH + ")) AND handoff_id = ?1"
    " ORDER BY seq LIMIT ?3"
)

SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")

# Handoff records kept in memory, the least recently used dropped first. This process is the
# only writer of its file (a lock beside it says so; several replicas need Redis), so a record
# it wrote or read stays true until it writes it again; a commit still checks the version.
RECORDS_CACHED = 4096
# With a record, the message ids its handoff has seen and sent, all of them, read from the
# file at its first webhook and added to as its commits store more, while all cached ids are no
# more than IDS_CACHED, as fingerprints of 8 bytes (see known_ids): a webhook then learns
# without a statement that its ids are new, and confirms with the file the few that may not be
# (a redelivery, an echo of the service's own post). Cached as strings, about 100 bytes each,
# the budget was 100,000 ids: ``make micro``'s route over 50 handoffs holding 200,000 ids took
# 250 µs of CPU a webhook then, 65 and 66 µs with fingerprints, as much as the route with no
# ids held (docs/bench/history.md has the commands for before and after).
# A handoff holding more than IDS_LOADED ids in the file when first read is not loaded, and its
# webhooks ask the file for their own ids: the ids its events carry are found by going through
# all of the handoff's entries in handoff_events (see _SEEN_IDS), at every webhook and
# the longer the more messages it has, where loading them is paid once (both on the event
# loop: the bound keeps that one read short). Past IDS_CACHED, the ids of the handoffs whose
# webhooks came least recently are dropped (and read again at their next webhook). A cached
# handoff keeps growing past IDS_LOADED: learning an id costs next to nothing.
# A handoff whose ids were dropped to make room is loaded again only into room left free,
# never by dropping others' (see SqliteStore._displaced): once the handoffs receiving webhooks
# hold more than IDS_CACHED ids in all, taking turns, each loaded whole to drop the next one's
# ids, so that every webhook read all of its handoff's ids from the file (``make micro``'s
# webhook route over the budget, below the webhook route's own line).
IDS_LOADED = 10_000
IDS_CACHED = 1_000_000
# Handoffs remembered as displaced from IDS_CACHED, the oldest forgotten first.
DISPLACED_KEPT = 100_000

_Queued = tuple[Commit, "asyncio.Future[list[StoredEvent]]"]

# In NORMAL mode the thread checkpoints the write-ahead log after every CHECKPOINT_EVERY
# commits: four or five thousand pages at four or five a commit, more than SQLite's own
# 1,000, since a page written many times is copied once a checkpoint (checkpointing more
# often cost more CPU in all). A checkpoint running beside the
# writer may never find the log wholly copied, and only then can the log start over: once
# it has grown past WAL_FRAMES_MAX frames, commits wait (queued, the event loop free) while
# the thread checkpoints again, copying only what was appended meanwhile. (The writer
# checkpointing itself on the event loop held it for milliseconds under make bench's ingest
# load, once a second, even for those few frames: most of it the two syncs.)
CHECKPOINT_EVERY = 1000

# A webhook changes a row in one place of the file, its event (its entry in handoff_events waits
# for the next bulk copy, see INDEX_EVERY; its handoff's version waits in memory, see
# SqliteStore._lagging), and every page changed is written to the log whole, then copied by
# the checkpoint. Pages of 2 KiB rather than
# SQLite's 4 KiB cost less to write than they add in depth; 1 KiB pages did no
# better (``make micro``'s webhook route, run twice with each value on 2026-11-26: 57 and 59 µs
# of CPU a webhook with 4 KiB, 56 and 56 with 2 KiB, 56 and 58 with 1 KiB). Only a new file
# takes it.
PAGE_SIZE = 2048
WAL_FRAMES_MAX = 16_384

log = logging.getLogger(__name__)


def _only_writer(path: str) -> int:
    """Locks ``<path>.lock`` for this process (the kernel lets go when the process ends,
    however it ends). A second process on the same file would see records this one keeps
    in memory go stale: it is refused, with what to do instead."""
    descriptor = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise sqlite3.OperationalError(
            "another process is using this file; each process needs a HANDOFF_SQLITE_PATH "
            "of its own, and replicas that share their state need REDIS_URL"
        ) from None
    return descriptor


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE, then COMMIT, or ROLLBACK and the error raised again."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            if db.in_transaction:
                db.execute("ROLLBACK")
        raise


def _unavailable(exc: Exception) -> Exception:
    """What a commit that failed with ``exc`` raises."""
    if isinstance(exc, sqlite3.Error):
        return StoreUnavailable(f"the SQLite store failed: {exc}")
    return exc  # ConcurrentUpdate, or a defect: the caller reports it as it is


class SqliteStore:
    """HandoffStore on one SQLite file. Open it with ``await SqliteStore.open(path)``."""

    def __init__(self, path: str, synchronous: str = "NORMAL") -> None:
        if synchronous.upper() not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}")
        self._path = path
        self._synchronous = synchronous.upper()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="sqlite-store"
        )
        self._conn: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None  # used on the executor's thread only
        self._lock_file: int | None = None  # held while open: this process is the writer
        # Statements on the event loop unless a commit may wait for the disk (see above).
        self._inline = self._synchronous in ("OFF", "NORMAL") and path != ":memory:"
        self._listener: EventListener | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        # Group commit (see ``commit``).
        self._queued: list[_Queued] = []
        self._flushing = False
        self._holding = False  # commits wait for a checkpoint (see WAL_FRAMES_MAX)
        self._flush_tasks: set[asyncio.Task[None]] = set()
        # Checkpoints on the thread (NORMAL mode, see CHECKPOINT_EVERY).
        self._commits_unchecked = 0
        self._checkpoint: asyncio.Task[None] | None = None
        # Events stored since the last copy to handoff_events (see INDEX_EVERY).
        self._unindexed = 0
        # Versions only memory has: handoff id -> (the version in the file, the handoff's
        # version). With statements on the event loop, a commit that leaves the record as it
        # was (the usual webhook) moves the version here rather than in the file: the file's
        # version was a statement and a page more written to the log for every webhook's
        # handoff, copied again by the checkpoint (see docs/bench/history.md, the eighth
        # round). The version check of a commit then compares with the
        # version here; every read of a record gives it (an evicted record read again from
        # the file included: a writer that read an older version still loses). The versions
        # go to the file with every checkpoint (so that at most CHECKPOINT_EVERY are kept)
        # and on closing. A process that dies loses them, with every caller that held one:
        # the next process starts from the file's, and only this process writes the file.
        self._lagging: dict[str, tuple[int, int]] = {}
        # Records by handoff id, and handoff ids by visitor id (see RECORDS_CACHED).
        self._records: collections.OrderedDict[str, Handoff] = collections.OrderedDict()
        self._by_visitor: dict[str, str] = {}
        # Seen and sent message ids of cached records, complete; None: too many to load
        # (see IDS_LOADED).
        # The least recently used handoff's go first when IDS_CACHED would be exceeded.
        self._ids: collections.OrderedDict[str, KnownIds | None] = collections.OrderedDict()
        self._ids_count = 0  # ids in ``_ids``
        # Handoffs whose ids went to make room for others' (see IDS_CACHED), with how many
        # they had then (they have no fewer now): their webhooks ask the file for their own
        # ids until their ids fit in the room left free.
        self._displaced: collections.OrderedDict[str, int] = collections.OrderedDict()

    @classmethod
    async def open(cls, path: str, synchronous: str = "NORMAL") -> Self:
        store = cls(path, synchronous)
        store._loop = asyncio.get_running_loop()
        await store._run(store._connect)
        # The reader opens now, and reads once so that SQLite opens the log file too: the
        # process's open files then stay as they are from start-up on.
        await store._read(lambda db: db.execute("SELECT COUNT(*) FROM handoffs").fetchone())
        return store

    def _connect(self) -> None:
        if self._path != ":memory:":
            Path(self._path).parent.mkdir(parents=True, exist_ok=True)
            self._lock_file = _only_writer(self._path)
        try:
            conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            try:
                self._conn = self._prepare(conn)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            if self._lock_file is not None:
                os.close(self._lock_file)
                self._lock_file = None
            raise

    def _prepare(self, conn: sqlite3.Connection) -> sqlite3.Connection:
        # A new file only (a file's page size is fixed once it has tables): see PAGE_SIZE.
        conn.execute(f"PRAGMA page_size={PAGE_SIZE}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self._synchronous}")
        if self._inline:  # the thread checkpoints (see CHECKPOINT_EVERY)
            conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(SCHEMA)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(events)")}
        if "received_at_ms" not in columns:  # a file made before the column existed
            conn.execute("ALTER TABLE events ADD COLUMN received_at_ms INTEGER NOT NULL DEFAULT 0")
        if "message_id" not in columns:  # a file made before message ids went with events
            conn.execute("ALTER TABLE events ADD COLUMN message_id TEXT")
        # A handoff's events in order, with their message ids: handoff_events, filled in bulk
        # (see INDEX_EVERY). Files made before it have an index on events instead (with ids,
        # events_by_handoff_with_ids, or without, events_by_handoff): their events are copied
        # now, once, and the index goes.
        try:
            self._index_tail(conn)
        except sqlite3.Error as exc:  # the reads scan the events past the mark meanwhile
            log.warning("SQLite: copying events to handoff_events failed; retried later: %s", exc)
        conn.execute("DROP INDEX IF EXISTS events_by_handoff_with_ids")
        conn.execute("DROP INDEX IF EXISTS events_by_handoff")
        columns = {row[1] for row in conn.execute("PRAGMA table_info(handoffs)")}
        if "release_at_ms" not in columns:  # a file made before the reorder window
            conn.execute("ALTER TABLE handoffs ADD COLUMN release_at_ms INTEGER")
        conn.execute(
            "CREATE INDEX IF NOT EXISTS handoffs_held ON handoffs (release_at_ms)"
            " WHERE release_at_ms IS NOT NULL"
        )
        return conn

    def set_listener(
        self,
        listener: EventListener,
        on_interrupt: InterruptListener,
        wants: WantsHandoff | None = None,
    ) -> None:
        """``on_interrupt`` is never called: commits and delivery happen in this process.
        ``wants`` is not asked: the events are at hand already, decoded."""
        self._listener = listener

    async def _run(self, fn: Callable[[], T]) -> T:
        """Runs ``fn`` (which uses the writing connection) where that connection lives."""
        if self._inline:
            if self._closed:
                raise StoreUnavailable("the store is closed")
            try:
                return fn()
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"the SQLite store failed: {exc}") from exc
        return await self._on_thread(fn)

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Runs a read that may be long on the thread, with the read-only connection (the
        writing one when it lives on that thread anyway)."""
        return await self._on_thread(lambda: fn(self._read_db()))

    async def _on_thread(self, fn: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"the SQLite store failed: {exc}") from exc
        except RuntimeError as exc:  # executor shut down
            raise StoreUnavailable("the store is closed") from exc

    def _read_db(self) -> sqlite3.Connection:
        if not self._inline:
            return self._db()
        if self._closed:
            raise sqlite3.ProgrammingError("store is not open")
        if self._reader is None:
            reader = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
            reader.execute("PRAGMA busy_timeout=5000")
            reader.execute("PRAGMA query_only=1")
            self._reader = reader
        return self._reader

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise sqlite3.ProgrammingError("store is not open")
        return self._conn

    # --- handoffs -----------------------------------------------------------------------

    async def create_handoff(self, handoff: Handoff) -> tuple[Handoff, bool]:
        def create() -> tuple[Handoff, bool]:
            db = self._db()
            try:
                db.execute(
                    "INSERT INTO handoffs (id, conversation_id, visitor_id, brevo_conversation_id,"
                    " state, created_at_ms, version, record) VALUES (?,?,?,?,?,?,?,?)",
                    (
                        handoff.id,
                        handoff.conversation_id,
                        handoff.visitor_id,
                        handoff.brevo_conversation_id,
                        handoff.state.value,
                        handoff.created_at_ms,
                        handoff.version,
                        handoff_to_json(handoff),
                    ),
                )
            except sqlite3.IntegrityError:
                existing = self._one(
                    _RECORD + " WHERE conversation_id = ? AND state != 'ENDED'",
                    (handoff.conversation_id,),
                )
                if existing is None:
                    raise
                return existing, False
            return handoff, True

        created = await self._run(create)
        self._remember(created[0])
        return created

    def _record(self, row: tuple[str, int]) -> Handoff:
        """A handoff from its row's ``record`` and ``version`` (see _UPDATE_VERSION), at the
        version memory has when the file's lags behind (see _lagging). Also on the thread:
        a read racing a commit may give the version before it, which that commit refuses."""
        handoff = handoff_from_json(row[0])
        lagging = self._lagging.get(handoff.id)
        version = row[1] if lagging is None else lagging[1]
        return handoff if handoff.version == version else handoff.at_version(version)

    def _one(self, sql: str, args: tuple[object, ...]) -> Handoff | None:
        row = self._db().execute(sql, args).fetchone()
        return self._record(row) if row else None

    def _remembered(self, handoff: Handoff | None) -> Handoff | None:
        if handoff is not None:
            self._remember(handoff)
        return handoff

    def _remember(self, handoff: Handoff) -> None:
        """On the event loop only (the cache has no lock)."""
        records = self._records
        records[handoff.id] = handoff
        records.move_to_end(handoff.id)
        self._by_visitor[handoff.visitor_id] = handoff.id
        if len(records) > RECORDS_CACHED:
            _, oldest = records.popitem(last=False)
            self._by_visitor.pop(oldest.visitor_id, None)
            self._drop_ids(oldest.id)

    def _forget(self, handoff_id: str) -> None:
        forgotten = self._records.pop(handoff_id, None)
        if forgotten is not None:
            self._by_visitor.pop(forgotten.visitor_id, None)
        self._drop_ids(handoff_id)

    def _cached(self, handoff_id: str | None) -> Handoff | None:
        if self._closed or handoff_id is None:
            return None
        handoff = self._records.get(handoff_id)
        if handoff is not None:
            self._records.move_to_end(handoff_id)
        return handoff

    async def _lookup(self, cached_id: str | None, column: str, value: str) -> Handoff | None:
        """The remembered record of ``cached_id``, else the one whose ``column`` is
        ``value`` in the file (remembered from then on)."""
        cached = self._cached(cached_id)
        if cached is not None:
            return cached
        sql = f"{_RECORD} WHERE {column} = ?"
        return self._remembered(await self._run(lambda: self._one(sql, (value,))))

    async def get_handoff(self, handoff_id: str) -> Handoff | None:
        return await self._lookup(handoff_id, "id", handoff_id)

    async def find_open_by_conversation(self, conversation_id: str) -> Handoff | None:
        return await self._run(
            lambda: self._one(
                _RECORD + " WHERE conversation_id = ? AND state != 'ENDED'",
                (conversation_id,),
            )
        )

    async def find_by_visitor(self, visitor_id: str) -> Handoff | None:
        return await self._lookup(self._by_visitor.get(visitor_id), "visitor_id", visitor_id)

    async def handoff_id_of_visitor(self, visitor_id: str) -> str | None:
        cached = self._by_visitor.get(visitor_id)
        if cached is not None and not self._closed:
            return cached
        row = await self._run(
            lambda: (
                self._db()
                .execute("SELECT id FROM handoffs WHERE visitor_id = ?", (visitor_id,))
                .fetchone()
            )
        )
        return str(row[0]) if row else None

    async def find_by_brevo_conversation(self, brevo_conversation_id: str) -> Handoff | None:
        return await self._run(
            lambda: self._one(
                _RECORD + " WHERE brevo_conversation_id = ? ORDER BY created_at_ms DESC LIMIT 1",
                (brevo_conversation_id,),
            )
        )

    async def pending_before(self, created_before_ms: int) -> list[Handoff]:
        def pending(db: sqlite3.Connection) -> list[Handoff]:
            rows = db.execute(
                _RECORD + " WHERE state = ? AND created_at_ms < ? ORDER BY created_at_ms",
                (HandoffState.PENDING_AGENT.value, created_before_ms),
            )
            return [self._record(r) for r in rows]

        return await self._read(pending)

    async def held_due(self, release_before_ms: int) -> list[Handoff]:
        def due(db: sqlite3.Connection) -> list[Handoff]:
            rows = db.execute(
                _RECORD + " WHERE release_at_ms <= ? ORDER BY release_at_ms",
                (release_before_ms,),
            )
            return [self._record(r) for r in rows]

        return await self._read(due)

    # --- the one write path ---------------------------------------------------------------

    async def commit(self, commit: Commit) -> list[StoredEvent]:
        """Queues ``commit`` for the next group commit and returns once it is durable.

        Commits made while the event loop is busy go to SQLite together, at the end of its
        next turn, in one transaction; a commit refused for its version leaves the others
        whole. A transaction's fixed cost (the write-ahead log append) was a fifth of a
        webhook's CPU when each commit had its own.
        """
        if self._closed:
            raise StoreUnavailable("the store is closed")
        done: asyncio.Future[list[StoredEvent]] = asyncio.get_running_loop().create_future()
        self._queued.append((commit, done))
        self._schedule_flush()
        return await done

    def _schedule_flush(self) -> None:
        """The queued commits go at the end of the event loop's next turn, unless a flush is
        due already or a checkpoint holds them (it schedules one when it lets go).

        The end, not the start (a timer due at once runs after the turn's other callbacks):
        the requests read in this turn make their commits in the next one, and go in the same
        transaction, whose own cost (BEGIN, COMMIT and the log append) was about as much
        CPU as all its statements under make bench's ingest load (py-spy). That run's ingest,
        taking turns with the code before, went from 47% and 44% of the bare route to 51%
        and 54% (2026-11-26), for one turn of the loop more before the answer.
        """
        if self._queued and not self._flushing and not self._holding:
            self._flushing = True
            asyncio.get_running_loop().call_later(0, self._flush_soon)

    def _flush_soon(self) -> None:
        if self._inline:
            self._flush_batch()
        else:
            task = asyncio.get_running_loop().create_task(self._flush_on_thread())
            self._flush_tasks.add(task)
            task.add_done_callback(self._flush_tasks.discard)

    def _flush_batch(self) -> None:
        if self._holding and not self._closed:  # flushed when the checkpoint is done
            self._flushing = False
            return
        batch, self._queued = self._queued, []
        self._flushing = False
        if batch:
            self._finish(batch, self._apply_batch(batch))
            self._commits_unchecked += len(batch)
            if (
                self._commits_unchecked >= CHECKPOINT_EVERY
                and self._checkpoint is None
                and not self._closed  # closing checkpoints anyway
            ):
                self._commits_unchecked = 0
                self._write_lagging_versions()
                self._start_checkpoint()

    def _write_lagging_versions(self) -> None:
        """Writes the versions only memory has to the file, in a transaction of their own
        (see _lagging). On the event loop (they exist only when statements run there). A
        failure leaves them in memory for the next time, and only delays their writing."""
        if not self._lagging:
            return
        # Unconditional: memory's version is the handoff's, whatever the file says.
        rows = [(live, handoff_id) for handoff_id, (_, live) in self._lagging.items()]
        try:
            with _transaction(self._db()) as db:
                db.executemany("UPDATE handoffs SET version = ? WHERE id = ?", rows)
        except sqlite3.Error as exc:
            log.warning(
                "SQLite: writing %d handoff versions failed; retried later: %s", len(rows), exc
            )
            return
        self._lagging.clear()

    def _index_tail(self, db: sqlite3.Connection) -> None:
        """Copies the events stored since the last copy to handoff_events, and moves the
        mark, in a transaction of its own. Raises sqlite3.Error, having written nothing."""
        with _transaction(db):
            (through,) = db.execute(_THROUGH).fetchone()
            (last,) = db.execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
            if last > through:
                db.execute(_INDEX_TAIL, (through, last))
                db.execute(_MOVE_THROUGH, (last,))

    def _start_checkpoint(self) -> None:
        self._checkpoint = asyncio.get_running_loop().create_task(self._checkpoint_on_thread())

    async def _checkpoint_on_thread(self) -> None:
        def checkpoint(db: sqlite3.Connection) -> tuple[int, int, int]:
            busy, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            return int(busy), int(frames), int(copied)

        try:
            _, frames, _ = await self._read(checkpoint)
            if frames > WAL_FRAMES_MAX and not self._closed:
                # Commits appended while the thread copied, so the log cannot start over;
                # with commits held, this copies those frames only, and all of them.
                self._holding = True
                await self._read(checkpoint)
        except StoreUnavailable as exc:
            if not self._closed:
                log.warning("SQLite checkpoint failed; the next one retries: %s", exc)
        finally:
            self._checkpoint = None
            if self._holding:
                self._holding = False
                self._schedule_flush()

    async def _flush_on_thread(self) -> None:
        # Commits queued while a batch waits for the disk form the next batch.
        while self._queued:
            batch, self._queued = self._queued, []
            try:
                outcomes = await self._on_thread(functools.partial(self._apply_batch, batch))
            except StoreUnavailable as exc:
                outcomes = [exc] * len(batch)
            self._finish(batch, outcomes)
        self._flushing = False

    def _apply_batch(self, batch: list[_Queued]) -> list[list[StoredEvent] | Exception]:
        """One transaction for the whole batch; the outcome of each commit, in batch order.

        A commit refused for its version is refused by its first statement, before it
        wrote anything: the others go on. Any other failure rolls the whole batch back
        (each of its commits then raises it). Never raises.
        """
        try:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            return [_unavailable(exc)] * len(batch)
        outcomes: list[list[StoredEvent] | Exception] = []
        versions: dict[str, tuple[int, int]] = {}  # this batch's changes to _lagging
        events = 0
        try:
            for commit, _ in batch:
                try:
                    stored = self._apply(db, commit, versions)
                except ConcurrentUpdate as exc:
                    outcomes.append(exc)
                else:
                    outcomes.append(stored)
                    events += len(stored)
            db.execute("COMMIT")
        except Exception as exc:
            with contextlib.suppress(sqlite3.Error):
                if db.in_transaction:
                    db.execute("ROLLBACK")
            return [_unavailable(exc)] * len(batch)
        for handoff_id, (in_file, live) in versions.items():
            if in_file == live:
                self._lagging.pop(handoff_id, None)
            else:
                self._lagging[handoff_id] = (in_file, live)
        self._unindexed += events
        if self._unindexed >= INDEX_EVERY:
            try:
                self._index_tail(db)
            except sqlite3.Error as exc:  # the reads scan a longer tail until the next try
                log.warning(
                    "SQLite: copying %d events to handoff_events failed; retried after the next"
                    " %d: %s",
                    self._unindexed,
                    INDEX_EVERY,
                    exc,
                )
                self._unindexed -= INDEX_EVERY
            else:
                self._unindexed = 0
        return outcomes

    def _finish(
        self, batch: list[_Queued], outcomes: Sequence[list[StoredEvent] | Exception]
    ) -> None:
        """Remembers the new records, hands the events to the listener in commit order,
        then answers each waiting commit."""
        for (commit, done), outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Exception):
                self._forget(commit.handoff.id)
                if not done.done():
                    done.set_exception(outcome)
                continue
            self._remember(commit.handoff.at_version(commit.expected_version + 1))
            if commit.seen_message_ids or commit.sent_message_ids:
                self._learn_ids(commit)
            if outcome and self._listener is not None:
                self._listener(outcome)
            if not done.done():
                done.set_result(outcome)

    def _apply(
        self, db: sqlite3.Connection, commit: Commit, versions: dict[str, tuple[int, int]]
    ) -> list[StoredEvent]:
        """Writes one commit; it checks the version first (and writes nothing when it is
        stale): against the version memory has when the file's lags behind (see _lagging,
        with ``versions``, the batch's changes to it, which this adds to), else by its first
        statement. What it writes of the record depends on what changed, known from the
        cached record at the expected version: nothing, with statements on the event loop,
        or else the version alone (the usual webhook), the record's text, or the indexed
        columns too."""
        h = commit.handoff
        version = commit.expected_version
        lagging = versions.get(h.id) or self._lagging.get(h.id)
        if lagging is not None and lagging[1] != version:
            raise ConcurrentUpdate(f"handoff {h.id} changed since it was read")
        # The version the file has: the statements below check it.
        in_file = version if lagging is None else lagging[0]
        before = self._records.get(h.id)
        if before is not None and before.version != version:
            before = None  # stale: the statement below refuses it
        unchanged = before is not None and (h is before or h == before)
        if unchanged and self._inline:
            # The cached record is at the expected version, and it is the file's (or
            # memory's, when it lags): nothing else writes the file.
            versions[h.id] = (in_file, version + 1)
            updated = 1
        elif unchanged:
            updated = db.execute(_UPDATE_VERSION, (version + 1, h.id, in_file)).rowcount
        elif (
            before is not None
            and before.state is h.state
            and before.brevo_conversation_id == h.brevo_conversation_id
            and before.next_release_ms == h.next_release_ms
        ):
            record = handoff_to_json(h, version=version + 1)
            updated = db.execute(_UPDATE_RECORD, (version + 1, record, h.id, in_file)).rowcount
        else:
            updated = db.execute(
                _UPDATE_ALL,
                (
                    h.state.value,
                    h.brevo_conversation_id,
                    version + 1,
                    handoff_to_json(h, version=version + 1),
                    h.next_release_ms,
                    h.id,
                    in_file,
                ),
            ).rowcount
        if updated != 1:
            raise ConcurrentUpdate(f"handoff {h.id} changed since it was read")
        if not (unchanged and self._inline):
            versions[h.id] = (version + 1, version + 1)  # the file has it
        stored: list[StoredEvent] = []
        carried: set[str] = set()  # message ids stored with their events
        for event in commit.events:
            payload = event.payload
            message_id = payload.brevo_message_id if isinstance(payload, AgentMessage) else None
            if message_id is not None:
                carried.add(message_id)
            cursor = db.execute(
                "INSERT INTO events (handoff_id, conversation_id, occurred_at_ms, payload,"
                " received_at_ms, message_id) VALUES (?,?,?,?,?,?)",
                (
                    h.id,
                    h.conversation_id,
                    event.occurred_at_ms,
                    payload_to_json(payload),
                    event.received_at_ms,
                    message_id,
                ),
            )
            seq = cursor.lastrowid
            assert seq is not None
            stored.append(event.stored(seq, h))
        # An id an event carries is known by its event; seen_messages holds the others
        # (messages dropped or held). A row there for every webhook was a place more it
        # changed in the file: ``make micro``'s webhook route took 130, 134 and 142 µs of CPU
        # a webhook with it, 112, 115 and 121 without (runs taking turns, 2026-11-26).
        left = [(h.id, m) for m in commit.seen_message_ids if m not in carried]
        if left:
            db.executemany("INSERT OR IGNORE INTO seen_messages VALUES (?,?)", left)
        if commit.sent_message_ids:
            db.executemany(
                "INSERT OR IGNORE INTO sent_messages VALUES (?,?)",
                [(h.id, m) for m in commit.sent_message_ids],
            )
        if commit.client_message is not None:
            db.execute(
                "INSERT OR IGNORE INTO client_messages VALUES (?,?,?)",
                (h.id, *commit.client_message),
            )
        return stored

    # --- message ids ----------------------------------------------------------------------

    def _learn_ids(self, commit: Commit) -> None:
        """Adds a stored commit's ids to its handoff's cached ids (making room within
        IDS_CACHED)."""
        handoff_id = commit.handoff.id
        cached = self._ids.get(handoff_id)
        if cached is None:
            return
        before = len(cached)
        cached.add(commit.seen_message_ids, commit.sent_message_ids)
        self._ids_count += len(cached) - before
        if self._ids_count > IDS_CACHED:
            self._ids.move_to_end(handoff_id)
            self._make_room(0)

    def _drop_ids(self, handoff_id: str) -> None:
        cached = self._ids.pop(handoff_id, None)
        if cached is not None:
            self._ids_count -= len(cached)

    def _keep_ids(self, handoff_id: str, ids: KnownIds | None) -> None:
        count = 0 if ids is None else len(ids)
        self._make_room(count)
        self._ids[handoff_id] = ids
        self._ids_count += count

    def _make_room(self, count: int) -> None:
        """Drops the least recently used handoffs' ids until ``count`` more fit in
        IDS_CACHED. (Handoffs that stopped getting messages kept theirs until their records
        left the cache, and new ones were then refused: every webhook of theirs asked the
        file.)"""
        while self._ids and self._ids_count + count > IDS_CACHED:
            oldest = next(iter(self._ids))
            ids = self._ids[oldest]
            if ids is not None:
                self._displaced[oldest] = len(ids)
                self._displaced.move_to_end(oldest)
                if len(self._displaced) > DISPLACED_KEPT:
                    self._displaced.popitem(last=False)
            self._drop_ids(oldest)

    def _load_ids(self, handoff_id: str) -> KnownIds | None:
        """A cached record's ids, read whole from the file at its first webhook and kept
        (None, kept too: more than IDS_LOADED, its webhooks ask the file). A handoff that
        was displaced (see _make_room) is kept again only when its ids fit in the room left
        free; else None, not kept: this webhook asks the file for its own ids."""
        held = self._displaced.get(handoff_id)
        if held is not None:
            room = min(IDS_LOADED, IDS_CACHED - self._ids_count)
            loaded = self._all_ids(handoff_id, room) if held <= room else None
            if loaded is not None:
                del self._displaced[handoff_id]
                self._keep_ids(handoff_id, loaded)  # it fits: drops no others'
            return loaded
        loaded = self._all_ids(handoff_id, IDS_LOADED)
        self._keep_ids(handoff_id, loaded)
        return loaded

    def _all_ids(self, handoff_id: str, most: int) -> KnownIds | None:
        """Every id the handoff has seen and sent, or None when there are more than
        ``most``."""
        rows = (
            self._db()
            .execute(
                _KEPT_IDS.format(also="") + " LIMIT ?",
                (handoff_id,) * _KEPT_IDS.count("{also}") + (most + 1,),
            )
            .fetchall()
        )
        if len(rows) > most:
            return None
        return KnownIds(
            (message_id for table, message_id in rows if not table),
            (message_id for table, message_id in rows if table),
        )

    def _known(
        self, handoff_id: str, ids: Sequence[str], query: str = _KEPT_IDS
    ) -> tuple[set[str], set[str]]:
        """Which of ``ids`` the handoff has seen and sent, in one statement for the places
        ``query`` asks (all three by default; a webhook carries a message or a few; no more
        than 999 parameters a statement, SQLite's limit before 3.32)."""
        seen: set[str] = set()
        sent: set[str] = set()
        unique = list(dict.fromkeys(ids))
        places = query.count("{also}")
        for start in range(0, len(unique), 300):
            chunk = unique[start : start + 300]
            marks = ",".join("?" * len(chunk))
            rows = self._db().execute(
                query.format(also=f" AND message_id IN ({marks})"),
                (handoff_id, *chunk) * places,
            )
            for table, message_id in rows:
                (sent if table else seen).add(message_id)
        return seen, sent

    def _confirm(
        self, handoff_id: str, maybe_seen: list[str], maybe_sent: list[str]
    ) -> tuple[set[str], set[str]]:
        """The ids whose fingerprints matched, each asked of the file where it would be:
        an echo (maybe sent) costs a key lookup, never a pass over the handoff's events."""
        seen = self._known(handoff_id, maybe_seen, _SEEN_IDS)[0] if maybe_seen else set()
        sent = self._known(handoff_id, maybe_sent, _SENT_IDS)[1] if maybe_sent else set()
        return seen, sent

    def _all_new_by_cache(self, handoff_id: str, message_ids: Sequence[str]) -> Handoff | None:
        """The cached record, when the handoff's cached ids say that every one of
        ``message_ids`` is new: the usual webhook, which needs nothing from the file and no
        await. None otherwise (not cached, ids not cached, or a fingerprint that matches)."""
        handoff = self._cached(handoff_id)
        ids = self._ids.get(handoff_id) if handoff is not None else None
        if ids is None:
            return None
        self._ids.move_to_end(handoff_id)
        maybe_seen, maybe_sent = ids.candidates(message_ids)
        return handoff if not maybe_seen and not maybe_sent else None

    async def read_for_webhook(self, handoff_id: str, message_ids: Sequence[str]) -> WebhookRead:
        usual = self._all_new_by_cache(handoff_id, message_ids)
        if usual is not None:
            return WebhookRead(usual, set(), set())
        handoff = await self.get_handoff(handoff_id)
        if handoff is None:
            return WebhookRead(None, set(), set())
        if handoff_id in self._ids:
            cached = self._ids[handoff_id]
            self._ids.move_to_end(handoff_id)
        elif self._inline and handoff_id in self._records:
            # The first webhook of a cached record reads all its ids, to spare the next ones
            # (inline, nothing can commit in between).
            cached = await self._run(lambda: self._load_ids(handoff_id))
        else:
            cached = None
        if cached is not None:
            maybe_seen, maybe_sent = cached.candidates(message_ids)
            if not maybe_seen and not maybe_sent:
                return WebhookRead(handoff, set(), set())  # all new (ids loaded just now)
            seen, sent = await self._run(lambda: self._confirm(handoff_id, maybe_seen, maybe_sent))
            return WebhookRead(handoff, seen, sent)
        seen, sent = await self._run(lambda: self._known(handoff_id, message_ids))
        return WebhookRead(handoff, seen, sent)

    def last_known(self, handoff_id: str) -> Handoff | None:
        """The remembered record: the file's own (this process is its only writer)."""
        return self._cached(handoff_id)

    async def commit_if_new(
        self, commit: Commit, message_ids: Sequence[str]
    ) -> list[StoredEvent] | WebhookRead:
        """The read costs no round trip here (records and ids are in memory, mostly): it
        is made first, and the commit's own version check covers what may commit between."""
        usual = self._all_new_by_cache(commit.handoff.id, message_ids)
        if usual is not None and usual.version == commit.expected_version:
            return await self.commit(commit)
        read = await self.read_for_webhook(commit.handoff.id, message_ids)
        if (
            read.handoff is None
            or read.handoff.version != commit.expected_version
            or read.seen
            or read.sent
        ):
            return read
        return await self.commit(commit)

    async def client_message(self, handoff_id: str, client_message_id: str) -> str | None:
        def lookup() -> str | None:
            row = (
                self._db()
                .execute(
                    "SELECT brevo_message_id FROM client_messages"
                    " WHERE handoff_id = ? AND client_message_id = ?",
                    (handoff_id, client_message_id),
                )
                .fetchone()
            )
            return str(row[0]) if row else None

        return await self._run(lookup)

    # --- the event log --------------------------------------------------------------------

    async def read_events(
        self, handoff_id: str | None, after_seq: int, limit: int
    ) -> list[StoredEvent]:
        def read(db: sqlite3.Connection) -> list[StoredEvent]:
            if handoff_id is None:
                rows = db.execute(_READ_ALL_EVENTS, (after_seq, limit))
            else:
                rows = db.execute(_READ_HANDOFF_EVENTS, (handoff_id, after_seq, limit))
            return [
                StoredEvent(r[0], r[1], r[2], r[3], payload_from_json(r[4]), r[5]) for r in rows
            ]

        return await self._read(read)

    async def last_seq(self) -> int:
        def last() -> int:
            row = self._db().execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()
            return int(row[0])

        return await self._run(last)

    async def ping(self) -> None:
        await self._run(lambda: self._db().execute("SELECT 1").fetchone())

    async def close(self) -> None:
        """Closes the connection; closing twice is harmless."""
        if self._closed:
            return
        self._closed = True  # no new commit from here on
        # Commits already queued go to the file first.
        while self._flush_tasks:
            await asyncio.gather(*self._flush_tasks, return_exceptions=True)
        if self._checkpoint is not None:
            await asyncio.gather(self._checkpoint, return_exceptions=True)
        if self._queued:
            if self._inline:
                self._flush_batch()
            else:
                await self._flush_on_thread()
        if self._inline:
            self._write_lagging_versions()
        self._records.clear()
        self._by_visitor.clear()
        self._ids.clear()
        self._ids_count = 0
        self._displaced.clear()

        def close_reader() -> None:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

        def close() -> None:
            close_reader()
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if self._lock_file is not None:
                os.close(self._lock_file)  # releases the lock
                self._lock_file = None

        try:
            if self._inline:
                await self._on_thread(close_reader)
                close()
            else:
                await self._on_thread(close)
        finally:
            self._executor.shutdown(wait=True)
