"""Serves grpc.aio-style servicers on grpclib, so that both gRPC servers run the same code.

The servicers here (HandoffServicer, grpc's health servicer, grpc's reflection servicer) are
written for grpc.aio: a method takes the request and a context, and returns the response,
writes the responses through the context (health's Watch) or yields them (reflection).
``servicer_handlers`` turns one of them into grpclib's handlers, and ``_Context`` is the part
of grpc.aio's context those servicers use; StreamAgentReplies has a handler of its own
(``grpclib_server``). Every handler here also:

- reads each request itself, refusing one over ``max_request_bytes`` before reading it
  (grpclib would read any size) and answering one that does not parse with INVALID_ARGUMENT;
- checks the bearer token, as grpc.aio's ``BearerAuth`` interceptor does.
"""

from __future__ import annotations

import asyncio
import inspect
import struct
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from grpclib.server import Stream

from service.core.access import TokenSet
from service.rpc.auth import refusal

_PREFIX = struct.Struct(">?I")  # gRPC's message prefix: compressed flag, length
# How long a refused bidirectional call may take to finish sending (see ``bidirectional``).
_REFUSED_DRAIN_S = 1.0

STOPPING = (
    "the server is stopping: call again (you will reach another replica); a reply stream "
    "resumes with after_cursor set to the last cursor it received"
)


def status_error(code: grpc.StatusCode, details: str = "") -> GRPCError:
    """grpclib's way of ending a call with ``code``."""
    return GRPCError(Status(code.value[0]), details or None)


class _Context:
    """What the servicers use of ``grpc.aio.ServicerContext``, over a grpclib stream."""

    __slots__ = ("_stream",)

    def __init__(self, stream: Stream[Any, Any]) -> None:
        self._stream = stream

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise status_error(code, details)

    async def send_initial_metadata(self, metadata: Any) -> None:
        await self._stream.send_initial_metadata(metadata=tuple(metadata) or None)

    async def write(self, message: Message) -> None:
        await self._stream.send_message(message)


async def receive(
    stream: Stream[Any, Any], message_type: type[Message], max_request_bytes: int
) -> Message | None:
    """The next request of ``stream``, or None once the client has sent them all."""
    # grpclib keeps the HTTP/2 stream private; grpclib is pinned to the release read here.
    h2_stream = stream._stream
    prefix = await h2_stream.recv_data(_PREFIX.size)
    if not prefix:
        return None
    if len(prefix) != _PREFIX.size:
        raise GRPCError(Status.INVALID_ARGUMENT, "request: the message ended inside its prefix")
    compressed, length = _PREFIX.unpack(prefix)
    if compressed:
        raise GRPCError(
            Status.UNIMPLEMENTED, "compressed requests are not accepted: send them uncompressed"
        )
    if length > max_request_bytes:
        raise GRPCError(
            Status.RESOURCE_EXHAUSTED,
            f"the request is {length} bytes, over the {max_request_bytes} bytes a request "
            "may have: send attachments by URL, and history in fewer or shorter turns",
        )
    try:
        data = await h2_stream.recv_data(length)
    except AssertionError:  # grpclib's way of saying the stream ended early
        raise GRPCError(
            Status.INVALID_ARGUMENT, "request: the message ended before its length"
        ) from None
    try:
        return message_type.FromString(data)
    except DecodeError as exc:
        raise GRPCError(Status.INVALID_ARGUMENT, f"request: {exc}") from None


def _refusal(stream: Stream[Any, Any], method: str, tokens: TokenSet | None) -> str | None:
    if tokens is None:
        return None
    value = stream.metadata.get("authorization", "") if stream.metadata is not None else ""
    return refusal(tokens, method, value if isinstance(value, str) else "")


def _authorize(stream: Stream[Any, Any], method: str, tokens: TokenSet | None) -> None:
    refused = _refusal(stream, method, tokens)
    if refused is not None:
        raise GRPCError(Status.UNAUTHENTICATED, refused)


async def read_request(
    stream: Stream[Any, Any],
    method: str,
    request_type: type[Message],
    tokens: TokenSet | None,
    max_request_bytes: int,
) -> Message:
    """The one request of a call to ``method``, once its caller is authorized."""
    _authorize(stream, method, tokens)
    request = await receive(stream, request_type, max_request_bytes)
    if request is None:
        raise GRPCError(Status.INVALID_ARGUMENT, "request: the call carried no message")
    return request


_CARDINALITY = {
    (False, False): Cardinality.UNARY_UNARY,
    (False, True): Cardinality.UNARY_STREAM,
    (True, False): Cardinality.STREAM_UNARY,
    (True, True): Cardinality.STREAM_STREAM,
}

_Handle = Callable[[Stream[Any, Any]], Coroutine[Any, Any, None]]


class EndsOnStop:
    """``with`` it, a call that the server's stop cancels ends UNAVAILABLE, with a status the
    client can act on (grpclib would end it without one). One per server, holding nothing
    per call: an idle stream pays for no extra frame."""

    __slots__ = ("_stopping",)

    def __init__(self, stopping: asyncio.Event) -> None:
        self._stopping = stopping

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        # Otherwise the client went away or its deadline passed: grpclib answers.
        if kind is asyncio.CancelledError and self._stopping.is_set():
            raise GRPCError(Status.UNAVAILABLE, STOPPING) from None


def _handle(
    method: str,
    behaviour: Callable[..., Any],
    cardinality: Cardinality,
    request_type: type[Message],
    tokens: TokenSet | None,
    max_request_bytes: int,
    ends_on_stop: EndsOnStop,
) -> _Handle:
    async def one_request(stream: Stream[Any, Any]) -> Message:
        return await read_request(stream, method, request_type, tokens, max_request_bytes)

    async def requests(stream: Stream[Any, Any]) -> AsyncIterator[Message]:
        while (request := await receive(stream, request_type, max_request_bytes)) is not None:
            yield request

    if cardinality is Cardinality.UNARY_UNARY:

        async def unary(stream: Stream[Any, Any]) -> None:
            with ends_on_stop:
                request = await one_request(stream)
                await stream.send_message(await behaviour(request, _Context(stream)))

        return unary

    if cardinality is Cardinality.UNARY_STREAM and inspect.isasyncgenfunction(behaviour):
        # StreamAgentReplies has a handler of its own (grpclib_server), with one frame fewer
        # an idle stream than a generator driven from here.
        raise ValueError(f"{method}: a server stream that yields needs a handler of its own")

    if cardinality is Cardinality.UNARY_STREAM:  # writes through the context (health Watch)

        async def writing_stream(stream: Stream[Any, Any]) -> None:
            with ends_on_stop:
                await behaviour(await one_request(stream), _Context(stream))

        return writing_stream

    if cardinality is Cardinality.STREAM_STREAM:

        async def bidirectional(stream: Stream[Any, Any]) -> None:
            with ends_on_stop:
                refused = _refusal(stream, method, tokens)
                if refused is not None:
                    # grpclib resets a stream it ends with an error; a gRPC client still
                    # sending then reports INTERNAL rather than the status: let it finish.
                    async with asyncio.timeout(_REFUSED_DRAIN_S):
                        async for _ in requests(stream):
                            pass
                    raise GRPCError(Status.UNAUTHENTICATED, refused)
                async for item in behaviour(requests(stream), _Context(stream)):
                    await stream.send_message(item)

        return bidirectional

    raise ValueError(f"{method}: {cardinality.name} methods are not served here")


def servicer_handlers(
    servicer: object,
    service: Any,  # a ServiceDescriptor: protobuf's stubs type those of grpc's modules apart
    *,
    tokens: TokenSet | None,
    max_request_bytes: int,
    ends_on_stop: EndsOnStop,
    own: dict[str, Handler] | None = None,
) -> dict[str, Handler]:
    """grpclib's handlers for every method of ``service`` that ``servicer`` implements;
    ``own``: the handlers of those methods (by path) that are not served through it."""
    handlers: dict[str, Handler] = {}
    for method in service.methods:
        name = f"/{service.full_name}/{method.name}"
        if own is not None and name in own:
            handlers[name] = own[name]
            continue
        cardinality = _CARDINALITY[method.client_streaming, method.server_streaming]
        request_type = GetMessageClass(method.input_type)
        handle = _handle(
            name,
            getattr(servicer, method.name),
            cardinality,
            request_type,
            tokens,
            max_request_bytes,
            ends_on_stop,
        )
        handlers[name] = Handler(
            handle,
            cardinality,
            request_type,
            GetMessageClass(method.output_type),
        )
    return handlers


class Mapping:
    """A set of handlers in the shape grpclib's Server takes."""

    def __init__(self, handlers: dict[str, Handler]) -> None:
        self._handlers = handlers

    def __mapping__(self) -> dict[str, Handler]:
        return self._handlers
