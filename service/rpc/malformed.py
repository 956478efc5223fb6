"""Requests that do not parse get INVALID_ARGUMENT, not gRPC's UNKNOWN."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

SERVICE_PREFIX = "/handoff.v1."


class _Malformed:
    def __init__(self, problem: str) -> None:
        self.problem = problem


class RejectMalformed(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        # method -> (the handler found, its tolerant wrapper): built once per method, not
        # per call.
        self._wrapped: dict[str, tuple[object, grpc.RpcMethodHandler[Any, Any] | None]] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        found = await continuation(handler_call_details)
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is found:
            return cached[1]
        wrapped = _tolerant(found, method)
        if found is not None and len(self._wrapped) < 64:  # the service's few methods
            self._wrapped[method] = (found, wrapped)
        return wrapped


def _tolerant(
    found: grpc.RpcMethodHandler[Any, Any] | None, method: str
) -> grpc.RpcMethodHandler[Any, Any] | None:
    """``found`` with a request parser that reports a malformed request instead of raising."""
    handler: Any = found  # grpc's stubs type the behaviours as synchronous
    # Only this service's own handlers: grpc's health Watch, say, is no async generator.
    if (
        handler is None
        or handler.request_deserializer is None
        or not method.startswith(SERVICE_PREFIX)
    ):
        return found
    parse = handler.request_deserializer

    def tolerant(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return _Malformed(str(exc))

    if handler.unary_unary is not None:
        behaviour = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: {request.problem}")
            return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, tolerant, handler.response_serializer)
    if handler.unary_stream is not None:
        streaming = handler.unary_stream

        async def stream(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            if isinstance(request, _Malformed):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: {request.problem}")
            async for item in streaming(request, context):
                yield item
                del item  # not held while the stream waits for its next item

        return grpc.unary_stream_rpc_method_handler(stream, tolerant, handler.response_serializer)
    return found
