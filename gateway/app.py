"""Starlette app receiving Brevo Conversations webhooks at ``POST /webhooks/brevo/{token}``.

Thin by design: check the token, bound and decode the body, hand it to the core, and
answer 2xx only once the core has stored what it means. No handoff rule lives here.
"""

from __future__ import annotations

import json
import logging
import secrets
import time

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from service.core import errors
from service.core.access import SourceAllowList, TokenSet
from service.core.brevo_payloads import InvalidPayload
from service.core.codec import json_text
from service.core.handoffs import HandoffManager
from service.metrics import CONTENT_TYPE_LATEST, Metrics

log = logging.getLogger(__name__)


class _TooLarge(Exception):
    pass


class _Disconnected(Exception):
    pass


class BrevoWebhook:
    """``POST /webhooks/brevo/{token}``, as a plain ASGI app: ``Gateway`` hands it the
    token, and the Starlette router the rest of the requests on its path.

    The hot route: every agent message arrives through it. Starlette's Request and
    JSONResponse around it cost more than its own checks did (py-spy, make bench's load), so it
    reads the scope, the body and answers itself; the other routes are ordinary endpoints.
    """

    def __init__(
        self,
        manager: HandoffManager,
        tokens: TokenSet,
        max_body_bytes: int,
        metrics: Metrics,
        sources: SourceAllowList,
    ) -> None:
        self._manager = manager
        self._tokens = tokens
        self._max_body_bytes = max_body_bytes
        self._metrics = metrics
        self._sources = sources
        self._proxy_header = sources.proxy_header.lower().encode("latin-1")
        self._answers: dict[tuple[str, int], bytes] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """As a Starlette endpoint: the token is the route's path parameter."""
        await self.handle(str(scope["path_params"]["token"]), scope, receive, send)

    async def handle(self, token: str, scope: Scope, receive: Receive, send: Send) -> None:
        status, answer = await self._answer(token, scope, receive)
        body = answer if isinstance(answer, bytes) else json_text(answer).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        limit = self._max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise _TooLarge
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _answer(
        self, token: str, scope: Scope, receive: Receive
    ) -> tuple[int, dict[str, object] | bytes]:
        """The status and the answer: an object to encode, or one encoded already."""
        received_at_ms = time.time_ns() // 1_000_000
        counted = self._metrics
        # Neither check says which failed, nor logs the path: it holds a token.
        client = scope.get("client")
        forwarded = (
            [v.decode("latin-1") for n, v in scope["headers"] if n == self._proxy_header]
            if self._proxy_header
            else []
        )
        source = self._sources.source(client[0] if client else None, forwarded)
        if not self._sources.allows(source):
            counted.webhook("", "forbidden_source")
            log.warning("webhook refused: %s is outside WEBHOOK_ALLOWED_CIDRS", source)
            return 404, {"error": "not found"}
        if not self._tokens.accepts(token):
            counted.webhook("", "unauthorized")
            return 404, {"error": "not found"}
        try:
            raw = await self._read_body(scope, receive)
        except _TooLarge:
            counted.webhook("", "too_large")
            return 413, {"error": f"body larger than {self._max_body_bytes} bytes"}
        except _Disconnected:
            counted.webhook("", "invalid")
            return 400, {"error": "the client disconnected before sending the whole body"}
        try:
            body = _decode(raw)
        except RecursionError:
            counted.webhook("", "invalid")
            return 400, {"error": "body is nested too deeply to be a Brevo webhook"}
        except ValueError as exc:  # includes invalid UTF-8
            counted.webhook("", "invalid")
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            return 400, {"error": f"body is not valid JSON: {reason}"}
        event_name = _event_name(body)
        try:
            outcome = await self._manager.handle_webhook(body, received_at_ms)
        except InvalidPayload as exc:
            counted.webhook(event_name, "invalid")
            return 400, {"error": exc.problem}
        except errors.StoreUnavailable as exc:
            counted.webhook(event_name, "unavailable")
            log.warning("webhook not stored, answering 503 so Brevo retries: %s", exc)
            return 503, {"error": "temporarily unable to store the event; retry later"}
        except errors.HandoffError as exc:
            counted.webhook(event_name, "unavailable")
            log.warning("webhook not stored: %s", exc)
            return 503, {"error": "temporarily unable to handle the event; retry later"}
        except Exception:
            counted.webhook(event_name, "error")
            ref = secrets.token_hex(4)
            log.exception("webhook failed ref=%s", ref)
            return 500, {"error": f"internal error (ref {ref})"}
        counted.webhook(outcome.event_name, outcome.outcome)
        # One line per webhook only when debugging: at Brevo's rates it would be most of the
        # log and a tenth of the webhook's cost; the metrics count every outcome.
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "webhook %s: %d event(s)",
                outcome.outcome,
                outcome.events,
                extra={"handoff_id": outcome.handoff_id},
            )
        return 200, self._success_answer(outcome.outcome, outcome.events)

    def _success_answer(self, outcome: str, events: int) -> bytes:
        """``{"outcome": ..., "events": ...}`` encoded: the few there are are kept."""
        key = (outcome, events)
        answer = self._answers.get(key)
        if answer is None:
            answer = orjson.dumps({"outcome": outcome, "events": events})
            if len(self._answers) < 256:
                self._answers[key] = answer
        return answer


WEBHOOK_PREFIX = "/webhooks/brevo/"


class Gateway:
    """The gateway's ASGI app: a webhook ``POST`` goes straight to ``BrevoWebhook``, the rest
    (health, readiness, metrics, and any other method or path) through Starlette.

    Starlette's middleware and router around the webhook were a fifth of its cost under
    ``make bench``'s load (py-spy); the path they would match, ``/webhooks/brevo/{token}``
    with a token holding no ``/``, is matched here instead, and everything else still gets
    Starlette's answers (405 for another method on the webhook path, 404 elsewhere).
    """

    def __init__(self, webhook: BrevoWebhook, rest: Starlette) -> None:
        self.webhook = webhook
        self.rest = rest

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and not scope.get("root_path"):
            path: str = scope["path"]
            if path.startswith(WEBHOOK_PREFIX):
                token = path[len(WEBHOOK_PREFIX) :]
                if token and "/" not in token:
                    await self.webhook.handle(token, scope, receive, send)
                    return
        await self.rest(scope, receive, send)


def create_gateway(
    manager: HandoffManager,
    tokens: TokenSet,
    max_body_bytes: int,
    metrics: Metrics | None = None,
    sources: SourceAllowList | None = None,
) -> Gateway:
    """The webhook app. ``tokens``: the accepted secret last segments of the webhook URL;
    ``sources``: the addresses webhooks may come from (default: any)."""
    counted = metrics if metrics is not None else Metrics()
    allowed = sources if sources is not None else SourceAllowList()
    webhook = BrevoWebhook(manager, tokens, max_body_bytes, counted, allowed)

    async def healthz(request: Request) -> Response:
        """Liveness: the process answers. Never depends on Redis or Brevo."""
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        """Readiness: not shutting down, the Brevo key confirmed, the store answering (and,
        on Redis, this replica's event feed live)."""
        try:
            await manager.check_ready()
        except errors.HandoffError as exc:
            return JSONResponse({"status": "unavailable", "reason": str(exc)}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def metrics_page(request: Request) -> Response:
        """Prometheus text format."""
        return Response(counted.render(), media_type=CONTENT_TYPE_LATEST)

    rest = Starlette(
        routes=[
            Route(WEBHOOK_PREFIX + "{token}", webhook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_page, methods=["GET"]),
        ]
    )
    return Gateway(webhook, rest)


def _decode(raw: bytes) -> object:
    """The body as JSON: orjson, or the standard library wherever orjson refuses it (lone
    surrogates, deep nesting, NaN), so that the two accept the same bodies and a refused one
    gets the standard library's reason. One difference stays: orjson reads an integer beyond
    64 bits as a float. As a time, the reader refuses it either way; an id sent as such a
    number (Brevo's ids are strings) would be read as the float's text."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return json.loads(raw)


def _event_name(body: object) -> str:
    name = body.get("eventName") if isinstance(body, dict) else None
    return name if isinstance(name, str) else ""
