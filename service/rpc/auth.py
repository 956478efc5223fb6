"""Bearer-token authentication of gRPC calls, checked before any handler runs.

Health checking stays open: Kubernetes' gRPC probes and grpc-health-probe send no metadata.
Everything else (HandoffService, server reflection) needs ``authorization: Bearer <token>``
with one of the configured tokens.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from service.core.access import TokenSet, bearer_token

log = logging.getLogger(__name__)

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)

MISSING = (
    "this service requires authentication: send the metadata "
    "'authorization: Bearer <token>' with one of its GRPC_AUTH_TOKENS"
)
REFUSED = "the bearer token is not accepted: use a current one of the service's GRPC_AUTH_TOKENS"


def _metadata_value(details: grpc.HandlerCallDetails, key: str) -> str:
    for name, value in details.invocation_metadata or ():
        if name == key:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return ""


def _denied(
    handler: grpc.RpcMethodHandler[Any, Any], message: str
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same shape that refuses the call and runs nothing."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def refuse_stream(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - abort raised

    deserialize = handler.request_deserializer
    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse, deserialize, serialize)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, deserialize, serialize)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse, deserialize, serialize)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, deserialize, serialize)


def refusal(tokens: TokenSet, method: str, authorization: str) -> str | None:
    """Why a call to ``method`` with that ``authorization`` value is refused, or None.

    Shared by both gRPC servers (grpc.aio's interceptor below, and grpclib's adapter)."""
    if method.startswith(OPEN_PREFIXES):
        return None
    token = bearer_token(authorization)
    if token is None:
        log.info("gRPC call to %s refused: no bearer token", method)
        return MISSING
    if not tokens.accepts(token):
        log.warning("gRPC call to %s refused: bearer token not accepted", method)
        return REFUSED
    return None


class BearerAuth(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: TokenSet) -> None:
        self._tokens = tokens

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        refused = refusal(
            self._tokens,
            handler_call_details.method,
            _metadata_value(handler_call_details, "authorization"),
        )
        return handler if refused is None else _denied(handler, refused)
