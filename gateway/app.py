"""Starlette app receiving Brevo Conversations webhooks at ``POST /webhooks/brevo/{token}``.

Thin by design: check the token, bound and decode the body, hand it to the core, and
answer 2xx only once the core has stored what it means. No handoff rule lives here.
"""

from __future__ import annotations

import json
import logging
import secrets
import time

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.core import errors
from service.core.access import SourceAllowList, TokenSet
from service.core.brevo_payloads import InvalidPayload
from service.core.handoffs import HandoffManager
from service.metrics import CONTENT_TYPE_LATEST, Metrics

log = logging.getLogger(__name__)


class _TooLarge(Exception):
    pass


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_gateway(
    manager: HandoffManager,
    tokens: TokenSet,
    max_body_bytes: int,
    metrics: Metrics | None = None,
    sources: SourceAllowList | None = None,
) -> Starlette:
    """The webhook app. ``tokens``: the accepted secret last segments of the webhook URL;
    ``sources``: the addresses webhooks may come from (default: any)."""
    counted = metrics if metrics is not None else Metrics()
    allowed = sources if sources is not None else SourceAllowList()

    async def read_body(request: Request) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_body_bytes:
            raise _TooLarge
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise _TooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    async def brevo_webhook(request: Request) -> Response:
        received_at_ms = time.time_ns() // 1_000_000
        # Neither check says which failed, nor logs the path: it holds a token.
        source = allowed.source(
            request.client.host if request.client else None,
            request.headers.getlist(allowed.proxy_header) if allowed.proxy_header else [],
        )
        if not allowed.allows(source):
            counted.webhook("", "forbidden_source")
            log.warning("webhook refused: %s is outside WEBHOOK_ALLOWED_CIDRS", source)
            return _error(404, "not found")
        if not tokens.accepts(str(request.path_params["token"])):
            counted.webhook("", "unauthorized")
            return _error(404, "not found")
        try:
            raw = await read_body(request)
        except _TooLarge:
            counted.webhook("", "too_large")
            return _error(413, f"body larger than {max_body_bytes} bytes")
        except ClientDisconnect:
            counted.webhook("", "invalid")
            return _error(400, "the client disconnected before sending the whole body")
        try:
            body: object = json.loads(raw)
        except RecursionError:
            counted.webhook("", "invalid")
            return _error(400, "body is nested too deeply to be a Brevo webhook")
        except ValueError as exc:  # includes invalid UTF-8
            counted.webhook("", "invalid")
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            return _error(400, f"body is not valid JSON: {reason}")
        event_name = _event_name(body)
        try:
            outcome = await manager.handle_webhook(body, received_at_ms)
        except InvalidPayload as exc:
            counted.webhook(event_name, "invalid")
            return _error(400, exc.problem)
        except errors.StoreUnavailable as exc:
            counted.webhook(event_name, "unavailable")
            log.warning("webhook not stored, answering 503 so Brevo retries: %s", exc)
            return _error(503, "temporarily unable to store the event; retry later")
        except errors.HandoffError as exc:
            counted.webhook(event_name, "unavailable")
            log.warning("webhook not stored: %s", exc)
            return _error(503, "temporarily unable to handle the event; retry later")
        except Exception:
            counted.webhook(event_name, "error")
            ref = secrets.token_hex(4)
            log.exception("webhook failed ref=%s", ref)
            return _error(500, f"internal error (ref {ref})")
        counted.webhook(outcome.event_name, outcome.outcome)
        # One line per webhook only when debugging: at Brevo's rates it would be most of the
        # log and a tenth of the webhook's cost; the metrics count every outcome.
        log.debug(
            "webhook %s: %d event(s)",
            outcome.outcome,
            outcome.events,
            extra={"handoff_id": outcome.handoff_id},
        )
        return JSONResponse({"outcome": outcome.outcome, "events": outcome.events})

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

    return Starlette(
        routes=[
            Route("/webhooks/brevo/{token}", brevo_webhook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics_page, methods=["GET"]),
        ]
    )


def _event_name(body: object) -> str:
    name = body.get("eventName") if isinstance(body, dict) else None
    return name if isinstance(name, str) else ""
