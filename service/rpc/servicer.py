"""HandoffService over grpc.aio: decode, call the core, encode; errors become status codes."""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from service.core import errors
from service.core.handoffs import HandoffManager
from service.core.models import Heartbeat, StoredEvent
from service.rpc import convert
from service.rpc.generated.handoff.v1 import handoff_pb2 as pb
from service.rpc.generated.handoff.v1 import handoff_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

T = TypeVar("T")
Req = TypeVar("Req")
Resp = TypeVar("Resp")


def status_for(exc: errors.HandoffError) -> grpc.StatusCode:
    """The code that tells the caller what to do (see the comment on the service)."""
    match exc:
        case errors.InvalidArgument() | errors.BrevoRejected():
            return grpc.StatusCode.INVALID_ARGUMENT
        case errors.NotFound():
            return grpc.StatusCode.NOT_FOUND
        case errors.HandoffEndedError() | errors.NotReady() | errors.BrevoAuthRejected():
            return grpc.StatusCode.FAILED_PRECONDITION
        case errors.BrevoRateLimited() | errors.StreamOverflow():
            return grpc.StatusCode.RESOURCE_EXHAUSTED
        case (
            errors.BrevoUnavailable()
            | errors.StoreUnavailable()
            | errors.ShuttingDown()
            | errors.BrevoKeyUnchecked()
        ):
            return grpc.StatusCode.UNAVAILABLE
        case errors.ConcurrentUpdate():
            return grpc.StatusCode.ABORTED
        case errors.CursorExpired():
            return grpc.StatusCode.OUT_OF_RANGE
    return grpc.StatusCode.INTERNAL


def message_for(exc: errors.HandoffError) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, errors.BrevoRateLimited) and exc.retry_after_s is not None:
        text += f" (retry after {exc.retry_after_s:g} s)"
    return text


def internal_error(exc: Exception) -> str:
    """Logs an unexpected error under a reference; returns what the caller is told."""
    ref = secrets.token_hex(4)
    log.error("internal error ref=%s", ref, exc_info=exc)
    return f"internal error (ref {ref}); retry, and report the ref if it persists"


async def _abort_internal(context: grpc.aio.ServicerContext[Req, Resp], exc: Exception) -> None:
    await context.abort(grpc.StatusCode.INTERNAL, internal_error(exc))


def reply_item(item: Heartbeat | StoredEvent) -> pb.StreamAgentRepliesResponse:
    """An item of a reply stream, as StreamAgentReplies sends it."""
    if isinstance(item, Heartbeat):
        return convert.heartbeat_out(item.sent_at_ms)
    return convert.reply_out(item)


class CallsInFlight:
    """Runs the work of unary calls so that a cancelled call cannot stop it half-way, and
    counts it, so that shutdown can wait for exactly that work.

    A SendMessage cancelled between Brevo's answer and the commit (the client's deadline,
    a dropped connection, the end of a shutdown's grace) would have posted a message the
    store does not know of, and the client's retry would post it again. So the work runs
    in a task of its own that the call merely awaits: cancelling the call leaves the task
    running to its commit, and the retry finds the message already sent.
    """

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._abandoned: set[asyncio.Future[Any]] = set()

    async def run(self, work: Awaitable[T]) -> T:
        task = asyncio.ensure_future(work)
        self.count += 1
        self._idle.clear()
        task.add_done_callback(self._finished)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.done():
                self._abandoned.add(task)
            raise

    def _finished(self, task: asyncio.Future[Any]) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()
        if task not in self._abandoned:
            return  # its caller awaits it and receives its result or error
        self._abandoned.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            # Nobody else will hear of it: the caller gave up (and will retry).
            log.info("a call whose caller had given up failed: %s", error or type(error).__name__)

    async def wait_idle(self, timeout_s: float) -> bool:
        """True once no call is in flight, False if some still are after ``timeout_s``."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


def _unary(
    fn: Callable[[HandoffServicer, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]],
) -> Callable[[HandoffServicer, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]:
    @functools.wraps(fn)
    async def wrapper(
        self: HandoffServicer, request: Req, context: grpc.aio.ServicerContext[Req, Resp]
    ) -> Resp:
        try:
            return await self.calls.run(fn(self, request, context))
        except errors.HandoffError as exc:
            await context.abort(status_for(exc), message_for(exc))
        except Exception as exc:  # the caller gets a status, never a stack trace
            await _abort_internal(context, exc)
        raise AssertionError("context.abort returned")  # pragma: no cover

    return wrapper


class HandoffServicer(pb_grpc.HandoffServiceServicer):
    def __init__(self, manager: HandoffManager) -> None:
        self._manager = manager
        self.calls = CallsInFlight()

    @_unary
    async def StartHandoff(
        self,
        request: pb.StartHandoffRequest,
        context: grpc.aio.ServicerContext[pb.StartHandoffRequest, pb.StartHandoffResponse],
    ) -> pb.StartHandoffResponse:
        handoff, created = await self._manager.start(convert.start_request(request))
        return pb.StartHandoffResponse(handoff=convert.handoff_out(handoff), created=created)

    @_unary
    async def SendMessage(
        self,
        request: pb.SendMessageRequest,
        context: grpc.aio.ServicerContext[pb.SendMessageRequest, pb.SendMessageResponse],
    ) -> pb.SendMessageResponse:
        result = await self._manager.send(
            request.handoff_id,
            request.client_message_id,
            request.text,
            convert.attachments_in(list(request.attachments)),
        )
        return pb.SendMessageResponse(
            brevo_message_id=result.brevo_message_id, duplicate=result.duplicate
        )

    @_unary
    async def StopHandoff(
        self,
        request: pb.StopHandoffRequest,
        context: grpc.aio.ServicerContext[pb.StopHandoffRequest, pb.StopHandoffResponse],
    ) -> pb.StopHandoffResponse:
        handoff = await self._manager.stop(request.handoff_id, request.notice)
        return pb.StopHandoffResponse(handoff=convert.handoff_out(handoff))

    @_unary
    async def GetHandoff(
        self,
        request: pb.GetHandoffRequest,
        context: grpc.aio.ServicerContext[pb.GetHandoffRequest, pb.GetHandoffResponse],
    ) -> pb.GetHandoffResponse:
        handoff = await self._manager.get(request.handoff_id)
        return pb.GetHandoffResponse(handoff=convert.handoff_out(handoff))

    async def StreamAgentReplies(
        self,
        request: pb.StreamAgentRepliesRequest,
        context: grpc.aio.ServicerContext[
            pb.StreamAgentRepliesRequest, pb.StreamAgentRepliesResponse
        ],
    ) -> AsyncIterator[pb.StreamAgentRepliesResponse]:
        try:
            stream = await self._manager.events(request.handoff_id, request.after_cursor)
            # The request is valid: say so now rather than with the first item, which may be
            # a heartbeat away, so that the client (and any proxy) sees the stream open.
            await context.send_initial_metadata(())
            async for item in stream:
                yield reply_item(item)
                del item  # an idle stream holds nothing it sent (see HandoffManager._follow)
        except errors.HandoffError as exc:
            await context.abort(status_for(exc), message_for(exc))
        except Exception as exc:
            await _abort_internal(context, exc)
