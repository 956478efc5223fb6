"""Errors the core raises. Each says what the caller should do; adapters map them to codes."""

from __future__ import annotations


class HandoffError(Exception):
    """Base of every error a caller of the service can receive."""


class InvalidArgument(HandoffError):
    """The request is malformed; ``field`` names the culprit. Fix the request, do not retry."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(HandoffError):
    """No such handoff. Check the id."""


class HandoffEndedError(HandoffError):
    """The handoff is over; start a new one to reach an agent again."""


class NotReady(HandoffError):
    """The handoff is not ready for this call yet (its opening message was not delivered)."""


class BrevoUnavailable(HandoffError):
    """Brevo could not be reached or answered 5xx after every retry. Retry later."""


class BrevoRateLimited(HandoffError):
    """Brevo answered 429 after every retry. Retry after ``retry_after_s`` seconds."""

    def __init__(self, message: str, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BrevoAuthRejected(HandoffError):
    """Brevo refused the API key, or blocked this server's IP address. Fix the setup."""


class BrevoRejected(HandoffError):
    """Brevo refused the request itself (HTTP 400/404): the content cannot be sent as is."""


class StoreUnavailable(HandoffError):
    """The storage backend cannot be reached. Retry later."""


class ShuttingDown(HandoffError):
    """This replica is stopping. Reconnect (to another replica) and resume with the cursor."""


class BrevoKeyUnchecked(HandoffError):
    """Brevo has not confirmed the API key yet (it could not be reached). Not ready."""


class ConcurrentUpdate(HandoffError):
    """The handoff changed since it was read; the core re-reads and retries."""


class StreamOverflow(HandoffError):
    """A stream's reader fell too far behind. Reconnect with the last cursor received."""


class CursorExpired(HandoffError):
    """The cursor names a position the event log no longer holds (trimmed) or never held.

    Reconnect without a cursor: a one-handoff stream then replays what the log still holds,
    the all-handoffs stream starts from now.
    """


class InvalidCursor(InvalidArgument):
    def __init__(self, cursor: str) -> None:
        super().__init__(
            "after_cursor",
            f"{cursor[:40]!r} is not a cursor this service issued; pass a HandoffEvent.cursor "
            "value unchanged, or leave it empty",
        )
