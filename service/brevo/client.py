"""The Brevo Conversations HTTP client: posts as the configured agent, with retries.

Implements ``service.core.ports.BrevoApi`` on aiohttp: with its HTTP parser in C, a post takes
about half as long as httpx's (make bench's SendMessage table shows both, posting directly
to the same stand-in). Every failure ends as one of the core's errors
(``BrevoUnavailable``, ``BrevoRateLimited``, ``BrevoAuthRejected``, ``BrevoRejected``) with a
message that tells the operator what to do. The API key never appears in a message or log line.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp.helpers import get_env_proxy_for_url
from yarl import URL

from service.core.errors import (
    BrevoAuthRejected,
    BrevoRateLimited,
    BrevoRejected,
    BrevoUnavailable,
)
from service.core.models import SentMessage

__all__ = [
    "DEFAULT_BASE_URL",
    "AgentIdentity",
    "BrevoClient",
    "RetryPolicy",
    "retry_delay",
]

DEFAULT_BASE_URL = "https://api.brevo.com/v3"

log = logging.getLogger(__name__)

_RATE_LIMIT_RESET = "x-sib-ratelimit-reset"
_RETRY_AFTER = "retry-after"
_MAX_QUOTE = 300
# "IP", "IPs", "ip_address", "authorised_ips": an IP word not glued to other letters.
_IP_WORD = re.compile(r"(?<![a-z])ips?(?![a-z])", re.IGNORECASE)


@dataclass(frozen=True)
class AgentIdentity:
    """Who the service posts as in Brevo: an agent id, or an agent e-mail and name."""

    agent_id: str = ""  # post as this Brevo agent id, or else:
    agent_email: str = ""  # agentEmail + agentName (Brevo requires receivedFrom with these)
    agent_name: str = ""
    received_from: str = "handoff-service"  # sent as receivedFrom on every send


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 4
    base_delay_s: float = 0.25
    max_delay_s: float = 8.0
    max_rate_limit_wait_s: float = 30.0  # a 429 whose x-sib-ratelimit-reset is longer fails at once


@dataclass(frozen=True)
class _Answer:
    """An HTTP answer read in full: what the retry rules and error messages look at."""

    status: int
    headers: Mapping[str, str]  # case-insensitive (aiohttp's CIMultiDictProxy)
    content: bytes

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")


def _parse_seconds(value: str | None) -> float | None:
    """A non-negative number of seconds, or None when ``value`` is not one."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    if math.isnan(seconds) or seconds < 0:
        return None
    return seconds


def retry_delay(
    attempt: int, policy: RetryPolicy, rate_limit_reset: str | None, rng: random.Random
) -> float | None:
    """How long to wait after failed attempt number ``attempt`` (1-based); None: give up now.

    ``rate_limit_reset`` is Brevo's ``x-sib-ratelimit-reset`` header (seconds until the rate
    limit window resets). When it is a non-negative number, wait that long plus a small jitter,
    or give up (None) when that is longer than ``policy.max_rate_limit_wait_s``. Otherwise:
    exponential backoff with full jitter, capped at ``policy.max_delay_s``.
    """
    reset = _parse_seconds(rate_limit_reset)
    if reset is not None:
        if reset > policy.max_rate_limit_wait_s:
            return None
        return reset + rng.uniform(0.0, policy.base_delay_s)
    exponent = min(max(attempt, 1) - 1, 60)
    ceiling = min(policy.max_delay_s, policy.base_delay_s * float(2**exponent))
    return rng.uniform(0.0, max(ceiling, 0.0))


def _retry_after_s(response: _Answer) -> float | None:
    """Seconds to wait according to x-sib-ratelimit-reset, else Retry-After (seconds or date)."""
    reset = _parse_seconds(response.headers.get(_RATE_LIMIT_RESET))
    if reset is not None:
        return reset
    raw = response.headers.get(_RETRY_AFTER)
    seconds = _parse_seconds(raw)
    if seconds is not None or raw is None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _one_line(text: str, limit: int = _MAX_QUOTE) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _brevo_message(response: _Answer) -> str:
    """Brevo's ``message`` (with its ``code``) from an error body, leniently; raw text otherwise."""
    text = response.text
    try:
        body: object = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        message = body.get("message")
        code = body.get("code")
        if isinstance(message, str) and message.strip():
            quoted = _one_line(message)
            if isinstance(code, str) and code.strip():
                return f'{_one_line(code, 60)}: "{quoted}"'
            return f'"{quoted}"'
    if text.strip():
        return f'"{_one_line(text)}"'
    return "(empty body)"


class BrevoClient:
    """Posts to Brevo Conversations over one pooled HTTP connection set.

    Retries 429, 5xx and transport failures (connection errors, timeouts, dropped
    connections) with ``retry_delay`` and the injected ``sleep``. A retried send after a
    timeout may post the message twice: Brevo offers no idempotency key.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        identity: AgentIdentity,
        *,
        timeout_s: float = 10.0,
        retry: RetryPolicy = RetryPolicy(),
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: random.Random | None = None,
        observe: Callable[[str, str, float], None] | None = None,
    ) -> None:
        """``observe(endpoint, outcome, seconds)`` is told of every attempt: the endpoint
        ("POST /conversations/messages"), the HTTP status or "timeout"/"connection_error",
        and how long it took (for metrics)."""
        if not identity.agent_id and not (identity.agent_email and identity.agent_name):
            raise ValueError(
                "AgentIdentity needs agent_id, or agent_email and agent_name: Brevo has to "
                "know which agent the service posts as"
            )
        if retry.max_attempts < 1:
            raise ValueError("RetryPolicy.max_attempts must be at least 1")
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key.strip()
        self._identity = identity
        self._retry = retry
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        self._observe = observe
        self._timeout_s = timeout_s
        # Made on first use, on the event loop that uses it (aiohttp binds a session to one).
        self._http: aiohttp.ClientSession | None = None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            # HTTP(S)_PROXY and NO_PROXY from the environment, as most HTTP clients read
            # them, once: aiohttp's trust_env looks them (and ~/.netrc) up again on every
            # request, which cost more CPU than the rest of the post.
            try:
                proxy, proxy_auth = get_env_proxy_for_url(URL(self._base_url))
            except LookupError:
                proxy, proxy_auth = None, None
            self._http = aiohttp.ClientSession(
                headers={
                    "api-key": self._api_key,
                    "accept": "application/json",
                    "content-type": "application/json",
                },
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
                proxy=proxy,
                proxy_auth=proxy_auth,
            )
        return self._http

    @property
    def base_url(self) -> str:
        return self._base_url

    async def send_agent_message(self, visitor_id: str, text: str) -> SentMessage:
        """Posts ``text`` to the visitor's thread as the configured agent.

        POST /conversations/messages; returns the id and time Brevo gave the message.
        """
        body: dict[str, str] = {
            "visitorId": visitor_id,
            "text": text,
            "receivedFrom": self._identity.received_from,
        }
        if self._identity.agent_id:
            body["agentId"] = self._identity.agent_id
        else:
            body["agentEmail"] = self._identity.agent_email
            body["agentName"] = self._identity.agent_name
        response = await self._request("POST", "/conversations/messages", body)
        answer = self._json_object(response)
        message_id = answer.get("id") if answer is not None else None
        if not isinstance(message_id, str) or not message_id:
            raise BrevoUnavailable(
                f"Brevo answered without a message id (HTTP {response.status} to POST "
                "/conversations/messages); the message may or may not be in the Brevo inbox - "
                "check the conversation there before sending it again"
            )
        created = answer.get("createdAt") if answer is not None else None
        if isinstance(created, int | float) and not isinstance(created, bool) and created > 0:
            created_at_ms = int(created)
        else:
            created_at_ms = int(time.time() * 1000)
        return SentMessage(id=message_id, created_at_ms=created_at_ms)

    async def check_account(self) -> str:
        """Checks the API key (GET /account); returns e.g. ``account a@b.c (Example Ltd)``."""
        response = await self._request("GET", "/account", None)
        answer = self._json_object(response) or {}
        email_value = answer.get("email")
        company = answer.get("companyName")
        description = "account " + (
            _one_line(email_value, 120) if isinstance(email_value, str) and email_value else "?"
        )
        if isinstance(company, str) and company.strip():
            description += f" ({_one_line(company, 120)})"
        return description

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    # --- internals ----------------------------------------------------------------------

    @staticmethod
    def _json_object(response: _Answer) -> dict[str, object] | None:
        try:
            body: object = json.loads(response.content)
        except ValueError:
            return None
        if not isinstance(body, dict):
            return None
        return {str(k): v for k, v in body.items()}

    def _redact(self, text: str) -> str:
        """Never let the API key through, even if an error text happens to echo it."""
        if self._api_key:
            text = text.replace(self._api_key, "[api key]")
        return text

    async def _request(self, method: str, path: str, body: Mapping[str, str] | None) -> _Answer:
        """Sends one call with retries; returns a 2xx answer or raises one of the core errors."""
        url = self._base_url + path
        what = f"{method} {path}"
        attempts = self._retry.max_attempts
        for attempt in range(1, attempts + 1):
            last = attempt == attempts
            started = time.perf_counter()
            try:
                response = await self._send(method, url, body)
            except (aiohttp.ClientError, TimeoutError) as exc:
                timed_out = isinstance(exc, TimeoutError)
                if self._observe is not None:
                    outcome = "timeout" if timed_out else "connection_error"
                    self._observe(what, outcome, time.perf_counter() - started)
                problem = self._redact(self._problem(exc))
                if last:
                    raise BrevoUnavailable(
                        f"Could not reach Brevo at {self._base_url} for {what} after {attempts} "
                        f"attempts ({problem}); check this server's network access to Brevo "
                        "and the configured base URL, then retry later"
                    ) from None
                delay = retry_delay(attempt, self._retry, None, self._rng)
                log.warning(
                    "Brevo %s failed (%s), retry %d/%d in %.2f s",
                    what,
                    problem,
                    attempt,
                    attempts - 1,
                    delay or 0.0,
                )
                await self._sleep(delay or 0.0)
                continue

            status = response.status
            if self._observe is not None:
                self._observe(what, str(status), time.perf_counter() - started)
            if 200 <= status < 300:
                return response
            quoted = self._redact(_brevo_message(response))
            if status in (401, 403):
                raise BrevoAuthRejected(self._auth_message(status, what, quoted))
            if status == 429:
                retry_after = _retry_after_s(response)
                header = response.headers.get(_RATE_LIMIT_RESET)
                if header is None and retry_after is not None:
                    header = str(retry_after)  # Retry-After stands in for the Brevo header
                delay = None if last else retry_delay(attempt, self._retry, header, self._rng)
                if delay is None:
                    wait = (
                        f"retry after {retry_after:g} s"
                        if retry_after is not None
                        else "retry later"
                    )
                    raise BrevoRateLimited(
                        f"Brevo is rate limiting this account (HTTP 429 to {what}, after "
                        f"{attempt} attempt{'s' if attempt > 1 else ''}); {wait}. Brevo allows "
                        "about 100 API calls per hour on the general tier: reduce the traffic "
                        "or raise the account's limit",
                        retry_after,
                    )
                log.warning(
                    "Brevo %s rate limited (HTTP 429), retry %d/%d in %.2f s",
                    what,
                    attempt,
                    attempts - 1,
                    delay,
                )
                await self._sleep(delay)
                continue
            if status >= 500:
                if last:
                    raise BrevoUnavailable(
                        f"Brevo answered HTTP {status} to {what} after {attempts} attempts "
                        f"({quoted}); Brevo is having trouble, retry later"
                    )
                delay = retry_delay(attempt, self._retry, None, self._rng)
                log.warning(
                    "Brevo %s answered HTTP %d, retry %d/%d in %.2f s",
                    what,
                    status,
                    attempt,
                    attempts - 1,
                    delay or 0.0,
                )
                await self._sleep(delay or 0.0)
                continue
            raise BrevoRejected(
                f"Brevo rejected {what} with HTTP {status} ({quoted}); the request cannot be "
                "sent as is - fix it rather than retrying"
            )
        raise AssertionError("unreachable: the last attempt always returns or raises")

    async def _send(self, method: str, url: str, body: Mapping[str, str] | None) -> _Answer:
        async with self._session().request(
            method,
            url,
            data=None if body is None else json.dumps(body).encode(),
            allow_redirects=False,
        ) as response:
            content = await response.read()
            return _Answer(response.status, response.headers, content)

    def _problem(self, exc: BaseException) -> str:
        """What went wrong on the way, in a few words: the kind of failure and its detail."""
        if isinstance(exc, TimeoutError):
            return f"no answer within {self._timeout_s:g} s (timeout)"
        problem = type(exc).__name__
        detail = _one_line(str(exc), 200)
        if detail:
            problem += f": {detail}"
        return problem

    @staticmethod
    def _auth_message(status: int, what: str, quoted: str) -> str:
        if _IP_WORD.search(quoted):
            return (
                f"Brevo blocked {what} because this server's IP address is not authorised "
                f"(HTTP {status}, {quoted}); the API key may be fine: add this server's IP "
                "address in Brevo under Security -> Authorised IPs, or turn IP blocking off"
            )
        return (
            f"Brevo refused the API key or this server's IP address (HTTP {status} to {what}, "
            f"{quoted}); check that the configured key is a valid Brevo API key (xkeysib-...) "
            "for this account, and that this server's IP address is authorised in Brevo "
            "(Security -> Authorised IPs)"
        )
