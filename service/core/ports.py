"""The interfaces the core needs from the outside world, as Protocols."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

from service.core.errors import HandoffError
from service.core.models import Commit, Handoff, SentMessage, StoredEvent, WebhookRead

EventListener = Callable[[Sequence[StoredEvent]], None]
InterruptListener = Callable[[HandoffError], None]
WantsHandoff = Callable[[str], bool]  # whether this process follows a handoff's events


class BrevoApi(Protocol):
    """Posting to Brevo Conversations as the configured agent.

    Raises BrevoUnavailable, BrevoRateLimited, BrevoAuthRejected or BrevoRejected.
    """

    async def send_agent_message(self, visitor_id: str, text: str) -> SentMessage: ...

    async def check_account(self) -> str:
        """Checks the API key; returns a short description of the account."""
        ...


class HandoffStore(Protocol):
    """Handoffs, the event log, seen/sent message ids and client message ids.

    Every committed event, whichever process committed it, is handed to the listener in
    log order, exactly once per process, so live subscribers see what the log holds and
    nothing else. When that feed breaks (a shared backend became unreachable, or events
    were trimmed before this process saw them) ``on_interrupt`` is called instead, so that
    live streams end and resume from the log rather than silently miss events.
    ``wants(handoff_id)`` may say that nobody in this process follows a handoff: a store
    that reads events back from a shared log may then leave that handoff's events out
    (undecoded) rather than hand them over. Raises StoreUnavailable when the backend cannot
    be reached.
    """

    def set_listener(
        self,
        listener: EventListener,
        on_interrupt: InterruptListener,
        wants: WantsHandoff | None = None,
    ) -> None: ...

    async def create_handoff(self, handoff: Handoff) -> tuple[Handoff, bool]:
        """Stores a new handoff unless one is already open for its conversation_id.

        Returns (the open handoff for that conversation, whether this call created it).
        """
        ...

    async def get_handoff(self, handoff_id: str) -> Handoff | None: ...

    async def find_open_by_conversation(self, conversation_id: str) -> Handoff | None: ...

    async def find_by_visitor(self, visitor_id: str) -> Handoff | None: ...

    async def handoff_id_of_visitor(self, visitor_id: str) -> str | None:
        """The id of the handoff made for this Brevo visitor, if any (cheap: a handoff's
        visitor never changes, so a backend may remember it)."""
        ...

    async def find_by_brevo_conversation(self, brevo_conversation_id: str) -> Handoff | None: ...

    async def commit(self, commit: Commit) -> list[StoredEvent]:
        """Applies the change atomically; raises ConcurrentUpdate on a version mismatch."""
        ...

    async def read_for_webhook(self, handoff_id: str, message_ids: Sequence[str]) -> WebhookRead:
        """Everything a webhook needs before it is planned, in one read: the handoff and
        which of ``message_ids`` were handled or sent for it (see WebhookRead)."""
        ...

    def last_known(self, handoff_id: str) -> Handoff | None:
        """The handoff as this process last read or wrote it, if it still holds it, without
        asking the backend: another process may have changed it since. Only for planning a
        change that ``commit_if_new`` then applies."""
        ...

    async def commit_if_new(
        self, commit: Commit, message_ids: Sequence[str]
    ) -> list[StoredEvent] | WebhookRead:
        """Applies ``commit`` (as ``commit`` does) only if the handoff is still at its
        expected version and none of ``message_ids`` was handled or sent for it: what a
        webhook planned on ``last_known`` assumed. Otherwise writes nothing and returns what
        ``read_for_webhook(handoff id, message_ids)`` reads now, to plan again on; a
        backend for which that read is a round trip answers with it in the same one. May
        still raise ConcurrentUpdate (the version moved after it was checked)."""
        ...

    async def client_message(self, handoff_id: str, client_message_id: str) -> str | None:
        """The Brevo message id a client message was already posted as, if any."""
        ...

    async def read_events(
        self, handoff_id: str | None, after_seq: int, limit: int
    ) -> list[StoredEvent]:
        """Events after ``after_seq`` (one handoff's, or all), oldest first.

        ``after_seq`` 0 reads from the oldest event still held. Raises CursorExpired when
        events after a non-zero ``after_seq`` were trimmed from the log.
        """
        ...

    async def last_seq(self) -> int:
        """The position of the newest event in the log (0 when empty)."""
        ...

    async def pending_before(self, created_before_ms: int) -> list[Handoff]:
        """Handoffs still waiting for an agent that were created before the given time."""
        ...

    async def held_due(self, release_before_ms: int) -> list[Handoff]:
        """Handoffs holding agent messages (the reorder window) due at or before the given
        time, soonest first."""
        ...

    async def ping(self) -> None:
        """Raises StoreUnavailable when the backend cannot serve."""
        ...

    async def close(self) -> None: ...


class Locks(Protocol):
    """Mutual exclusion by key, across every process that shares the store.

    Held around calls to Brevo that must happen once (the opening message, a client's
    message, the closing notice), so that two replicas never both post.
    """

    def hold(self, key: str) -> AbstractAsyncContextManager[None]: ...
