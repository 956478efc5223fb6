"""Starlette app receiving Brevo Conversations webhooks at ``POST /webhooks/brevo/{token}``.

Thin by design: check the token, bound and decode the body, hand it to the core, and
answer 2xx only once the core has stored what it means. No handoff rule lives here.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from service.core import errors
from service.core.brevo_payloads import InvalidPayload
from service.core.handoffs import HandoffManager

log = logging.getLogger(__name__)


class _TooLarge(Exception):
    pass


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_gateway(manager: HandoffManager, token: str, max_body_bytes: int) -> Starlette:
    """The webhook app. ``token`` is the secret last segment of the webhook URL."""
    expected = token.encode()

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
        given = str(request.path_params["token"]).encode()
        if not hmac.compare_digest(given, expected):
            return _error(404, "not found")
        try:
            raw = await read_body(request)
        except _TooLarge:
            return _error(413, f"body larger than {max_body_bytes} bytes")
        except ClientDisconnect:
            return _error(400, "the client disconnected before sending the whole body")
        try:
            body: object = json.loads(raw)
        except RecursionError:
            return _error(400, "body is nested too deeply to be a Brevo webhook")
        except ValueError as exc:  # includes invalid UTF-8
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            return _error(400, f"body is not valid JSON: {reason}")
        try:
            outcome = await manager.handle_webhook(body)
        except InvalidPayload as exc:
            return _error(400, exc.problem)
        except errors.StoreUnavailable as exc:
            log.warning("webhook not stored, answering 503 so Brevo retries: %s", exc)
            return _error(503, "temporarily unable to store the event; retry later")
        except errors.HandoffError as exc:
            log.warning("webhook not stored: %s", exc)
            return _error(503, "temporarily unable to handle the event; retry later")
        except Exception:
            ref = secrets.token_hex(4)
            log.exception("webhook failed ref=%s", ref)
            return _error(500, f"internal error (ref {ref})")
        if outcome.outcome == "stored":
            log.info(
                "webhook stored %d event(s)",
                outcome.events,
                extra={"handoff_id": outcome.handoff_id},
            )
        else:
            log.debug("webhook %s", outcome.outcome)
        return JSONResponse({"outcome": outcome.outcome, "events": outcome.events})

    async def healthz(request: Request) -> Response:
        """Liveness: the process answers. Never depends on Redis or Brevo."""
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        """Readiness: the store answers (and, on Redis, this replica's event feed is live)."""
        try:
            await manager.check_ready()
        except errors.HandoffError as exc:
            return JSONResponse({"status": "unavailable", "reason": str(exc)}, status_code=503)
        return JSONResponse({"status": "ready"})

    return Starlette(
        routes=[
            Route("/webhooks/brevo/{token}", brevo_webhook, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
        ]
    )
