"""The handoff manager: every use case of the service, over the store and Brevo ports."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import field

from service.core import errors
from service.core.brevo_payloads import KNOWN_EVENTS, WebhookEvent, parse_webhook
from service.core.fanout import HEARTBEAT_DUE, EventHub
from service.core.immutable import immutable
from service.core.inbound import ServiceIdentity, plan_inbound
from service.core.locks import KeyedLocks
from service.core.log_context import bind_handoff
from service.core.models import (
    AgentMessage,
    Attachment,
    Commit,
    EndReason,
    Handoff,
    HandoffEnded,
    HandoffState,
    Heartbeat,
    HistoryTurn,
    NewEvent,
    StoredEvent,
    User,
    WebhookRead,
    decode_cursor,
)
from service.core.outbound import opening_parts, user_message_text
from service.core.ports import BrevoApi, HandoffStore, Locks
from service.core.reorder import release_held

log = logging.getLogger(__name__)

MAX_ID_CHARS = 200
MAX_ATTACHMENTS = 20
MAX_URL_CHARS = 2048
MAX_MAP_ENTRIES = 64
MAX_HISTORY_TURNS = 500
MAX_FIELD_CHARS = 1000  # user.id/name/email/picture_url, title
MAX_OPENING_TEXT_CHARS = 100_000  # description and history together: at most ~25 posts
COMMIT_ATTEMPTS = 20
RELEASE_SWEEP_S = 1.0  # how often held messages a lost timer left behind are looked for


@immutable
class HandoffSettings:
    identity: ServiceIdentity
    user_prefix: str = "Botpress User: "
    closing_notice: str = "The bot has ended this conversation; the user is no longer connected."
    timeout_notice: str = (
        "No agent answered in time: the user was told and is back with the bot. "
        "Messages written here now will not reach them."
    )
    agent_timeout_s: float = 0.0  # 0 = off
    opening_max_chars: int = 4000
    max_text_chars: int = 10_000
    stream_buffer: int = 1000
    replay_page: int = 500
    heartbeat_s: float = 15.0
    reorder_window_s: float = 0.0  # 0 = agent messages go to the log at once
    log_message_text: bool = False  # personal data: only when debugging asks for it


@immutable
class StartRequest:
    conversation_id: str
    user: User = field(default_factory=User)
    title: str = ""
    description: str = ""
    history: tuple[HistoryTurn, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)


@immutable
class SendResult:
    brevo_message_id: str
    duplicate: bool


@immutable
class WebhookOutcome:
    """What the gateway answers Brevo: ``outcome`` is stored, duplicate, ignored or unknown."""

    outcome: str
    events: int = 0
    handoff_id: str = ""
    event_name: str = ""


def new_id(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(12)}"


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class HandoffManager:
    def __init__(
        self,
        store: HandoffStore,
        brevo: BrevoApi,
        settings: HandoffSettings,
        *,
        clock_ms: Callable[[], int] = wall_clock_ms,
        make_id: Callable[[str], str] = new_id,
        locks: Locks | None = None,
        on_delivered: Callable[[StoredEvent, bool], None] | None = None,
    ) -> None:
        """``locks`` must exclude every process sharing ``store``; the default, in-process
        locks, suit a store only this process uses. ``on_delivered(event, live)`` is told of
        every event a stream's reader took: ``live`` when it came from the live feed rather
        than from replaying the store (for metrics)."""
        self._store = store
        self._brevo = brevo
        self.settings = settings
        self._now = clock_ms
        self._make_id = make_id
        self._hub = EventHub(settings.stream_buffer, settings.heartbeat_s)
        # In-process locks only spare needless store conflicts; correctness across processes
        # comes from the store's versioned commits and from ``_exclusive`` around Brevo posts.
        self._locks = KeyedLocks()
        self._exclusive: Locks = locks if locks is not None else KeyedLocks()
        self.stats: Counter[str] = Counter()
        self._on_delivered = on_delivered or _ignore_delivery
        self._shutting_down: errors.ShuttingDown | None = None
        self._brevo_key_checked = False
        # The reorder window: one timer per handoff holding messages, and the releases the
        # timers started (kept so that they are not garbage-collected mid-way).
        self._release_timers: dict[str, tuple[int, asyncio.TimerHandle]] = {}
        self._releases: set[asyncio.Task[None]] = set()
        store.set_listener(self._hub.publish, self._hub.interrupt, self._hub.wants)

    @property
    def open_streams(self) -> int:
        return self._hub.subscriber_count

    # --- Readiness and shutdown -----------------------------------------------------------

    async def check_brevo_key(self) -> str:
        """Asks Brevo whether the API key is valid; remembers a yes. Returns Brevo's answer.

        Raises BrevoAuthRejected for a refused key, BrevoUnavailable when Brevo cannot say.
        """
        account = await self._brevo.check_account()
        self._brevo_key_checked = True
        return account

    @property
    def brevo_key_checked(self) -> bool:
        return self._brevo_key_checked

    async def check_ready(self) -> None:
        """Raises while this process should get no traffic: it is shutting down, Brevo has
        not confirmed the API key yet, or the store is out of reach."""
        if self._shutting_down is not None:
            raise self._shutting_down
        if not self._brevo_key_checked:
            raise errors.BrevoKeyUnchecked(
                "Brevo has not confirmed the API key yet (it could not be reached); checking again"
            )
        await self._store.ping()

    def begin_shutdown(self) -> None:
        """Drains the streams: every open one ends now with ShuttingDown, new ones are
        refused with it. Calls in flight and new unary calls carry on until the servers stop.
        """
        if self._shutting_down is not None:
            return
        self._shutting_down = errors.ShuttingDown(
            "this replica is shutting down; reconnect (you will reach another replica) with "
            "after_cursor set to the last cursor received"
        )
        self._hub.interrupt(self._shutting_down)

    # --- StartHandoff ---------------------------------------------------------------------

    async def start(self, request: StartRequest) -> tuple[Handoff, bool]:
        """Opens a handoff, or returns the open one of the same conversation (posting nothing)."""
        _require_id("conversation_id", request.conversation_id)
        _check_map("user.attributes", request.user.attributes)
        _check_map("metadata", request.metadata)
        if len(request.history) > MAX_HISTORY_TURNS:
            raise errors.InvalidArgument(
                "history", f"at most {MAX_HISTORY_TURNS} turns; send only the most recent ones"
            )
        user = request.user
        for name, value in (
            ("user.id", user.id),
            ("user.name", user.name),
            ("user.email", user.email),
            ("user.picture_url", user.picture_url),
            ("title", request.title),
        ):
            if len(value) > MAX_FIELD_CHARS:
                raise errors.InvalidArgument(name, f"at most {MAX_FIELD_CHARS} characters")
        opening_chars = len(request.description) + sum(len(t.text) for t in request.history)
        if opening_chars > MAX_OPENING_TEXT_CHARS:
            raise errors.InvalidArgument(
                "history",
                f"the description and history hold {opening_chars} characters, more than "
                f"{MAX_OPENING_TEXT_CHARS} the agent can be shown; send the most recent turns",
            )
        async with self._locks.hold(f"conversation:{request.conversation_id}"):
            existing = await self._store.find_open_by_conversation(request.conversation_id)
            created = existing is None
            if existing is None:
                now = self._now()
                parts = opening_parts(
                    user=request.user,
                    title=request.title,
                    description=request.description,
                    history=request.history,
                    max_chars=self.settings.opening_max_chars,
                )
                fresh = Handoff(
                    id=self._make_id("ho_"),
                    conversation_id=request.conversation_id,
                    visitor_id=self._make_id("hf_"),
                    state=HandoffState.PENDING_AGENT,
                    created_at_ms=now,
                    updated_at_ms=now,
                    metadata=dict(request.metadata),
                    opening_parts=parts,
                )
                existing, created = await self._store.create_handoff(fresh)
            bind_handoff(existing.id)
            if created:
                log.info("handoff started")
            if existing.opening_complete:
                return existing, created
            return await self._post_opening(existing.id), created

    async def _post_opening(self, handoff_id: str) -> Handoff:
        async with self._exclusive.hold(f"send:{handoff_id}"):
            handoff = await self._get(handoff_id)
            while not handoff.opening_complete and handoff.is_open:
                part = handoff.opening_parts[handoff.opening_posted]
                sent = await self._brevo.send_agent_message(handoff.visitor_id, part)
                handoff, _ = await self._update(handoff_id, _opening_part_posted(sent.id))
            return handoff

    # --- SendMessage ----------------------------------------------------------------------

    async def send(
        self,
        handoff_id: str,
        client_message_id: str,
        text: str,
        attachments: Sequence[Attachment] = (),
    ) -> SendResult:
        _require_id("handoff_id", handoff_id)
        bind_handoff(handoff_id)
        _require_id("client_message_id", client_message_id)
        if not text.strip() and not attachments:
            raise errors.InvalidArgument("text", "empty: give a text, an attachment, or both")
        if len(text) > self.settings.max_text_chars:
            raise errors.InvalidArgument(
                "text",
                f"{len(text)} characters; split it into messages of at most "
                f"{self.settings.max_text_chars}",
            )
        _check_attachments(attachments)
        async with self._exclusive.hold(f"send:{handoff_id}"):
            handoff = await self._get(handoff_id)
            already = await self._store.client_message(handoff_id, client_message_id)
            if already is not None:
                self.stats["messages_to_agent_duplicate"] += 1
                return SendResult(already, duplicate=True)
            _require_open(handoff)
            if not handoff.opening_complete:
                raise errors.NotReady(
                    f"handoff {handoff_id}: the opening message has not reached Brevo yet; "
                    "call StartHandoff again with the same conversation_id, then retry"
                )
            body = user_message_text(self.settings.user_prefix, text, attachments)
            sent = await self._brevo.send_agent_message(handoff.visitor_id, body)
            await self._update(
                handoff_id,
                lambda h: Commit(
                    h,
                    h.version,
                    sent_message_ids=(sent.id,),
                    client_message=(client_message_id, sent.id),
                ),
            )
            self.stats["messages_to_agent"] += 1
            log.debug("relayed to the agent as %s: %s", sent.id, self._loggable(text))
            return SendResult(sent.id, duplicate=False)

    # --- StopHandoff / GetHandoff ---------------------------------------------------------

    async def stop(self, handoff_id: str, notice: str = "") -> Handoff:
        _require_id("handoff_id", handoff_id)
        bind_handoff(handoff_id)
        if len(notice) > self.settings.max_text_chars:
            raise errors.InvalidArgument("notice", f"at most {self.settings.max_text_chars} chars")
        async with self._exclusive.hold(f"send:{handoff_id}"):
            handoff = await self._get(handoff_id)
            if not handoff.is_open:
                return handoff
            await self._brevo.send_agent_message(
                handoff.visitor_id, notice or self.settings.closing_notice
            )
            handoff, _ = await self._end(handoff_id, EndReason.STOPPED_BY_BOT)
            log.info("handoff stopped by the bot")
            return handoff

    async def get(self, handoff_id: str) -> Handoff:
        _require_id("handoff_id", handoff_id)
        bind_handoff(handoff_id)
        return await self._get(handoff_id)

    # --- Timeouts -------------------------------------------------------------------------

    async def expire_pending(self) -> int:
        """Ends the handoffs no agent took within the agent timeout; returns how many."""
        timeout_ms = int(self.settings.agent_timeout_s * 1000)
        if timeout_ms <= 0:
            return 0
        expired = 0
        for candidate in await self._store.pending_before(self._now() - timeout_ms):
            bind_handoff(candidate.id)
            async with self._exclusive.hold(f"send:{candidate.id}"):
                handoff = await self._get(candidate.id)
                if handoff.state is not HandoffState.PENDING_AGENT or handoff.held:
                    continue  # an agent took it, or has answered (held in the reorder window)
                try:
                    await self._brevo.send_agent_message(
                        handoff.visitor_id, self.settings.timeout_notice
                    )
                except errors.HandoffError as exc:
                    # The user must not wait on: end the handoff even if the agent's inbox
                    # cannot be told.
                    log.warning("could not post the timeout notice: %s", exc)
                _, events = await self._end(handoff.id, EndReason.TIMED_OUT)
                if events:
                    expired += 1
                    log.info("handoff timed out")
        return expired

    async def run_timeouts(self, interval_s: float) -> None:
        """Checks for timed-out handoffs every ``interval_s`` until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.expire_pending()
            except errors.HandoffError as exc:
                log.warning("agent-timeout check failed, will retry: %s", exc)

    # --- The reorder window -----------------------------------------------------------------

    @property
    def _reorder_window_ms(self) -> int:
        return round(self.settings.reorder_window_s * 1000)

    async def release_due(self, handoff_id: str) -> int:
        """Moves the held agent messages of a handoff that are due to the event log; returns
        how many events that stored. Safe to run on any replica, any number of times."""
        bind_handoff(handoff_id)

        def change(h: Handoff) -> Commit | None:
            released, events = release_held(h, self._now())
            return Commit(released, h.version, events=events) if events else None

        async with self._locks.hold(f"inbound:{handoff_id}"):
            handoff, stored = await self._update(handoff_id, change)
        self._schedule_release(handoff)
        return len(stored)

    async def release_overdue(self) -> int:
        """Releases what every handoff holds past its time: messages whose timer was lost
        (the replica that held them stopped or crashed). Returns how many events."""
        return sum([await self.release_due(h.id) for h in await self._store.held_due(self._now())])

    async def run_releases(self, interval_s: float = RELEASE_SWEEP_S) -> None:
        """Calls ``release_overdue`` every ``interval_s`` until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.release_overdue()
            except errors.HandoffError as exc:
                log.warning("releasing held agent messages failed, will retry: %s", exc)

    def _schedule_release(self, handoff: Handoff) -> None:
        """Wakes ``release_due`` when the next message this handoff holds is due."""
        at_ms = handoff.next_release_ms
        if at_ms is None or self._shutting_down is not None:
            return
        scheduled = self._release_timers.get(handoff.id)
        if scheduled is not None:
            if scheduled[0] <= at_ms:
                return
            scheduled[1].cancel()
        # One millisecond late rather than early: the release compares whole milliseconds.
        delay_s = max(0, at_ms - self._now() + 1) / 1000
        timer = asyncio.get_running_loop().call_later(delay_s, self._release_now, handoff.id)
        self._release_timers[handoff.id] = (at_ms, timer)

    def _release_now(self, handoff_id: str) -> None:
        self._release_timers.pop(handoff_id, None)
        task = asyncio.create_task(self._release_logged(handoff_id))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release_logged(self, handoff_id: str) -> None:
        try:
            await self.release_due(handoff_id)
        except errors.HandoffError as exc:
            log.warning("releasing held agent messages failed; the sweep retries: %s", exc)

    async def stop_releases(self) -> None:
        """Cancels the release timers and waits for the releases under way. What is still
        held stays in the store, for the sweep of this or another process."""
        for _, timer in self._release_timers.values():
            timer.cancel()
        self._release_timers.clear()
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)

    # --- Webhooks -------------------------------------------------------------------------

    async def handle_webhook(
        self, body: object, received_at_ms: int | None = None
    ) -> WebhookOutcome:
        """Stores what one Brevo webhook means. Returns only once it is stored.

        ``received_at_ms`` is when the webhook arrived (default: now); its events carry it,
        so that the time until they leave on a stream can be measured on any replica.

        Raises InvalidPayload for a body that is not a webhook, StoreUnavailable when the
        store cannot take it (the gateway answers 503 so that Brevo may retry).
        """
        received = self._now() if received_at_ms is None else received_at_ms
        event = parse_webhook(body)
        if event.event_name not in KNOWN_EVENTS:
            self.stats["webhooks_ignored_event"] += 1
            return WebhookOutcome("ignored_event", event_name=event.event_name)
        for problem in event.problems:
            log.warning("webhook %s: %s", event.event_name, problem)
        handoff_id = await self._route(event)
        if handoff_id is None:
            self.stats["webhooks_unknown_visitor"] += 1
            return WebhookOutcome("unknown_visitor", event_name=event.event_name)
        bind_handoff(handoff_id)
        message_ids = [m.id for m in event.messages]
        async with self._locks.hold(f"inbound:{handoff_id}"):
            # Planned first on the handoff as this process last knew it, its messages taken
            # as new: the store commits that plan only if both still hold, and otherwise
            # answers with what it holds, to plan again on. The usual webhook then costs a
            # shared backend one round trip, where reading first took two.
            guess = self._store.last_known(handoff_id)
            read: WebhookRead | None = None
            seen: set[str]
            sent: set[str]
            for _ in range(COMMIT_ATTEMPTS):
                guessed = read is None and guess is not None
                if guessed:
                    current, seen, sent = guess, set(), set()
                    guess = None  # one guess only
                else:
                    if read is None:
                        read = await self._store.read_for_webhook(handoff_id, message_ids)
                    current, seen, sent = read
                if current is None:  # gone since it was routed (expired from Redis)
                    self.stats["webhooks_unknown_visitor"] += 1
                    return WebhookOutcome("unknown_visitor", event_name=event.event_name)
                plan = plan_inbound(
                    current,
                    event,
                    seen=seen,
                    sent=sent,
                    identity=self.settings.identity,
                    now_ms=self._now(),
                    received_at_ms=received,
                    reorder_window_ms=self._reorder_window_ms,
                )
                if not plan.changes_anything and plan.handoff == current:
                    if guessed:  # the store has the last word
                        continue
                    self._count_dropped(plan.dropped)
                    self.stats["webhooks_duplicate"] += 1
                    return WebhookOutcome("duplicate", 0, current.id, event.event_name)
                commit = Commit(
                    plan.handoff,
                    current.version,
                    events=plan.events,
                    seen_message_ids=plan.seen_message_ids,
                )
                try:
                    if guessed:
                        outcome = await self._store.commit_if_new(commit, message_ids)
                        if isinstance(outcome, WebhookRead):
                            read = outcome
                            continue
                        stored = outcome
                    else:
                        stored = await self._store.commit(commit)
                except errors.ConcurrentUpdate:
                    read = None
                    continue
                if plan.dropped:
                    self._count_dropped(plan.dropped)
                self._schedule_release(plan.handoff)
                self.stats["webhooks_stored"] += 1
                debugging = log.isEnabledFor(logging.DEBUG)
                for new in plan.events:
                    if isinstance(new.payload, AgentMessage):
                        self.stats["messages_from_agent"] += 1
                        if debugging:
                            log.debug(
                                "agent message %s stored: %s",
                                new.payload.brevo_message_id,
                                self._loggable(new.payload.text),
                            )
                return WebhookOutcome("stored", len(stored), current.id, event.event_name)
        raise errors.StoreUnavailable("the handoff kept changing; retry the webhook")

    def _count_dropped(self, dropped: dict[str, int]) -> None:
        for reason, count in dropped.items():
            self.stats[f"messages_dropped_{reason}"] += count

    async def _route(self, event: WebhookEvent) -> str | None:
        """The id of the handoff a webhook is about: by its visitor, else by its chat."""
        if event.visitor_id:
            found = await self._store.handoff_id_of_visitor(event.visitor_id)
            if found is not None:
                return found
        if event.conversation_id:
            handoff = await self._store.find_by_brevo_conversation(event.conversation_id)
            return handoff.id if handoff is not None else None
        return None

    # --- StreamAgentReplies ---------------------------------------------------------------

    async def events(
        self, handoff_id: str, after_cursor: str
    ) -> AsyncIterator[StoredEvent | Heartbeat]:
        """Replays the events after ``after_cursor``, then follows new ones live.

        With a handoff id and no cursor the replay starts at the handoff's first event;
        with neither, the stream starts now. A one-handoff stream ends after HandoffEnded,
        and at once when it resumes after that event.
        Raises StreamOverflow when the reader fell more than the buffer behind live events.
        """
        if self._shutting_down is not None:
            raise self._shutting_down
        if handoff_id:
            _require_id("handoff_id", handoff_id)
            bind_handoff(handoff_id)
        after: int | None = None
        if after_cursor:
            after = decode_cursor(after_cursor)
            if after is None:
                raise errors.InvalidCursor(after_cursor)
        ended = False
        if handoff_id:
            ended = not (await self._get(handoff_id)).is_open
            if after is None:
                after = 0
        if after:
            newest = await self._store.last_seq()
            if after > newest:
                raise errors.CursorExpired(
                    f"after_cursor {after_cursor!r} is beyond the newest event ({newest}): the "
                    "event log was reset; reconnect without after_cursor"
                )
        return self._follow(handoff_id or None, after, ended)

    async def _follow(
        self, handoff_id: str | None, after: int | None, ended: bool = False
    ) -> AsyncIterator[StoredEvent | Heartbeat]:
        # Subscribe first, then read the store: what commits in between is in both, and the
        # sequence numbers drop the copy. Nothing can fall in a gap.
        sub = self._hub.subscribe(handoff_id)
        try:
            last = after if after is not None else await self._store.last_seq()
            while True:
                if self._shutting_down is not None:
                    raise self._shutting_down
                page = await self._store.read_events(handoff_id, last, self.settings.replay_page)
                full = len(page) == self.settings.replay_page
                for event in page:
                    yield event
                    self._on_delivered(event, False)
                    last = event.seq
                    if handoff_id and isinstance(event.payload, HandoffEnded):
                        return
                    del event  # see below
                # An idle stream keeps nothing of what it sent: a page held here while the
                # stream waits for live events was up to replay_page decoded events, this
                # stream's own copies, for as long as it stayed open.
                del page
                if sub.broken:
                    sub.reset()  # still catching up from the store: the buffer is not needed
                    continue
                if not full:
                    if ended:
                        # The handoff had ended and its end lies before the cursor (the
                        # client read it, then lost the stream): nothing more can come.
                        return
                    break
            while True:
                if sub.error is not None:
                    raise sub.error
                if sub.overflowed:
                    raise errors.StreamOverflow(
                        f"this stream fell more than {self.settings.stream_buffer} events "
                        "behind; reconnect with after_cursor set to the last cursor received"
                    )
                live = await sub.next()
                if live is HEARTBEAT_DUE:  # waited about heartbeat_s (see EventHub)
                    yield Heartbeat(self._now())
                    continue
                if live is None or live.seq <= last:
                    continue  # broken (said above), or already replayed from the store
                yield live
                self._on_delivered(live, True)
                last = live.seq
                if handoff_id and isinstance(live.payload, HandoffEnded):
                    return
                del live  # not held through the wait for the next one
        finally:
            self._hub.unsubscribe(sub)

    # --- Helpers --------------------------------------------------------------------------

    def _loggable(self, text: str) -> _LoggedText:
        """A message's text for a log line: only its length unless the settings allow it."""
        return _LoggedText(text, self.settings.log_message_text)

    async def _get(self, handoff_id: str) -> Handoff:
        handoff = await self._store.get_handoff(handoff_id)
        if handoff is None:
            raise errors.NotFound(
                f"no handoff {handoff_id[:80]!r}; use the id StartHandoff returned"
            )
        return handoff

    async def _update(
        self, handoff_id: str, change: Callable[[Handoff], Commit | None]
    ) -> tuple[Handoff, list[StoredEvent]]:
        """Applies ``change`` to the freshest record, retrying when another writer won."""
        for _ in range(COMMIT_ATTEMPTS):
            current = await self._get(handoff_id)
            commit = change(current)
            if commit is None:
                return current, []
            try:
                stored = await self._store.commit(commit)
            except errors.ConcurrentUpdate:
                continue
            return commit.handoff.at_version(current.version + 1), stored
        raise errors.StoreUnavailable(f"handoff {handoff_id} kept changing; retry")

    async def _end(self, handoff_id: str, reason: EndReason) -> tuple[Handoff, list[StoredEvent]]:
        def change(h: Handoff) -> Commit | None:
            if not h.is_open:
                return None
            now = self._now()
            flushed, released = release_held(h, now, flush=True)
            ended = dataclasses.replace(
                flushed, state=HandoffState.ENDED, end_reason=reason, updated_at_ms=now
            )
            return Commit(
                ended, h.version, events=(*released, NewEvent(now, HandoffEnded(reason), now))
            )

        return await self._update(handoff_id, change)


class _LoggedText:
    """A message's text as a log line shows it, formatted only when the line is written:
    the debug lines about every message cost nothing while debugging is off."""

    __slots__ = ("_shown", "_text")

    def __init__(self, text: str, shown: bool) -> None:
        self._text = text
        self._shown = shown

    def __str__(self) -> str:
        return repr(self._text) if self._shown else f"<{len(self._text)} characters>"


def _ignore_delivery(event: StoredEvent, live: bool) -> None:
    pass


def _opening_part_posted(sent_id: str) -> Callable[[Handoff], Commit]:
    def change(h: Handoff) -> Commit:
        posted = dataclasses.replace(h, opening_posted=h.opening_posted + 1)
        return Commit(posted, h.version, sent_message_ids=(sent_id,))

    return change


def _require_id(name: str, value: str) -> None:
    if not value.strip():
        raise errors.InvalidArgument(name, "required")
    if len(value) > MAX_ID_CHARS:
        raise errors.InvalidArgument(name, f"at most {MAX_ID_CHARS} characters")


def _require_open(handoff: Handoff) -> None:
    if not handoff.is_open:
        reason = handoff.end_reason.value if handoff.end_reason else "ENDED"
        raise errors.HandoffEndedError(
            f"handoff {handoff.id} has ended ({reason}); call StartHandoff to reach an agent again"
        )


def _check_map(name: str, values: dict[str, str]) -> None:
    if len(values) > MAX_MAP_ENTRIES:
        raise errors.InvalidArgument(name, f"at most {MAX_MAP_ENTRIES} entries")
    for key, value in values.items():
        if len(key) > 128 or len(value) > 2048:
            raise errors.InvalidArgument(
                f"{name}[{key[:40]!r}]", "keys at most 128, values at most 2048 characters"
            )


def _check_attachments(attachments: Sequence[Attachment]) -> None:
    if len(attachments) > MAX_ATTACHMENTS:
        raise errors.InvalidArgument("attachments", f"at most {MAX_ATTACHMENTS}")
    for index, attachment in enumerate(attachments):
        url = attachment.url
        if not url.startswith(("https://", "http://")) or len(url) > MAX_URL_CHARS:
            raise errors.InvalidArgument(
                f"attachments[{index}].url",
                "required: an http(s) link of at most 2048 characters the agent can open",
            )
        if any(ch in url for ch in " \n\r\t"):
            raise errors.InvalidArgument(f"attachments[{index}].url", "must not contain spaces")
