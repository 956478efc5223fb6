"""BrevoClient against the Brevo sandbox and a scripted server, over real sockets."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import pytest_asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from support import Dispatch, free_port

from service.brevo.client import AgentIdentity, BrevoClient, RetryPolicy, retry_delay
from service.brevo.sandbox import BrevoSandbox, Fault
from service.core.errors import (
    BrevoAuthRejected,
    BrevoRateLimited,
    BrevoRejected,
    BrevoUnavailable,
)
from service.http_server import RunningHttpServer, start_http_server

API_KEY = "xkeysib-0123456789abcdef-TestKeyDoNotLeak"
AGENT_ID = "Bridg3AgentId0001"
SERVICE_AGENT = {"id": AGENT_ID, "name": "Support Bot", "email": "bot@shop.example.com"}
SEND_PATH = "/v3/conversations/messages"
SEED = 7

# One event loop and one pair of HTTP servers for the whole module: stopping a uvicorn
# server takes ~0.15 s, too slow to do in every test. Each test gets its own sandbox.
# (The few pure tests are async as well, so that the module-wide mark fits them.)
pytestmark = pytest.mark.asyncio(loop_scope="module")


class RecordingSleep:
    """Stands in for asyncio.sleep: records the delays, waits for nothing."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


@dataclass
class Servers:
    sandbox: Dispatch
    sandbox_server: RunningHttpServer
    scripted: Dispatch
    scripted_server: RunningHttpServer


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def servers() -> AsyncIterator[Servers]:
    sandbox, scripted = Dispatch(), Dispatch()
    sandbox_server = await start_http_server(sandbox, "127.0.0.1", 0)
    scripted_server = await start_http_server(scripted, "127.0.0.1", 0)
    try:
        yield Servers(sandbox, sandbox_server, scripted, scripted_server)
    finally:
        await asyncio.gather(sandbox_server.stop(), scripted_server.stop())


@dataclass
class Env:
    sandbox: BrevoSandbox
    server: RunningHttpServer
    sleep: RecordingSleep = field(default_factory=RecordingSleep)
    clients: list[BrevoClient] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"{self.server.base_url}/v3"

    def client(
        self,
        *,
        identity: AgentIdentity | None = None,
        api_key: str = API_KEY,
        base_url: str | None = None,
        timeout_s: float = 5.0,
        retry: RetryPolicy | None = None,
    ) -> BrevoClient:
        client = BrevoClient(
            base_url if base_url is not None else self.base_url,
            api_key,
            identity if identity is not None else AgentIdentity(agent_id=AGENT_ID),
            timeout_s=timeout_s,
            retry=retry if retry is not None else RetryPolicy(),
            sleep=self.sleep,
            rng=random.Random(SEED),
        )
        self.clients.append(client)
        return client


@pytest_asyncio.fixture(loop_scope="module")
async def env(servers: Servers) -> AsyncIterator[Env]:
    sandbox = BrevoSandbox(api_key=API_KEY, auto_agent=False, service_agent=SERVICE_AGENT)
    servers.sandbox.target = sandbox.app
    environment = Env(sandbox=sandbox, server=servers.sandbox_server)
    try:
        yield environment
    finally:
        for client in environment.clients:
            await client.aclose()
        await sandbox.aclose()


@dataclass
class Scripted:
    """A fake Brevo that plays scripted answers and records what it was sent."""

    answers: list[Response]
    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)

    async def handle(self, request: Request) -> Response:
        self.requests.append(
            (request.method, request.url.path, dict(request.headers), await request.body())
        )
        return self.answers.pop(0)

    @property
    def app(self) -> Starlette:
        return Starlette(
            routes=[Route("/{path:path}", self.handle, methods=["GET", "POST"])],
        )


@pytest_asyncio.fixture(loop_scope="module")
async def scripted(servers: Servers) -> AsyncIterator[tuple[Scripted, str]]:
    fake = Scripted(answers=[])
    servers.scripted.target = fake.app
    yield fake, f"{servers.scripted_server.base_url}/v3"


def json_response(body: object, status: int = 200) -> Response:
    return Response(json.dumps(body), status_code=status, media_type="application/json")


def replay_uniform(*highs: float) -> list[float]:
    """What a Random(SEED) gives for successive uniform(0, high) calls."""
    rng = random.Random(SEED)
    return [rng.uniform(0.0, high) for high in highs]


# --- sending ----------------------------------------------------------------------------


async def test_send_returns_brevo_id_and_posts_agent_id_and_received_from(env: Env) -> None:
    client = env.client()
    before = int(time.time() * 1000)
    sent = await client.send_agent_message("hf_visitor_1", "Botpress User: my parcel is late")

    thread = env.sandbox.messages("hf_visitor_1")
    assert len(thread) == 1
    stored = thread[0]
    assert stored["id"] == sent.id
    assert re.fullmatch(r"[A-Za-z0-9]{17}", sent.id)
    assert stored["createdAt"] == sent.created_at_ms
    assert before <= sent.created_at_ms <= int(time.time() * 1000)
    assert stored["text"] == "Botpress User: my parcel is late"
    assert stored["agentId"] == AGENT_ID
    assert stored["agentName"] == "Support Bot"
    assert stored["receivedFrom"] == "handoff-service"
    assert env.sandbox.rest_calls == [("POST", SEND_PATH, 200)]
    assert env.sleep.delays == []


async def test_send_body_and_headers_exactly(scripted: tuple[Scripted, str]) -> None:
    fake, base_url = scripted
    fake.answers.append(json_response({"id": "Pl0OkM9iJn8UhB7yG", "createdAt": 1767225660500}))
    client = BrevoClient(base_url + "/", API_KEY, AgentIdentity(agent_id=AGENT_ID))
    try:
        sent = await client.send_agent_message("hf_1", "hello")
    finally:
        await client.aclose()

    assert sent.id == "Pl0OkM9iJn8UhB7yG"
    assert sent.created_at_ms == 1767225660500
    [(method, path, headers, body)] = fake.requests
    assert (method, path) == ("POST", SEND_PATH)  # trailing slash of the base URL stripped
    assert headers["api-key"] == API_KEY
    assert headers["accept"] == "application/json"
    assert headers["content-type"] == "application/json"
    assert json.loads(body) == {
        "visitorId": "hf_1",
        "text": "hello",
        "receivedFrom": "handoff-service",
        "agentId": AGENT_ID,
    }


async def test_send_as_agent_email_and_name(env: Env, scripted: tuple[Scripted, str]) -> None:
    identity = AgentIdentity(
        agent_email="relay@shop.example.com", agent_name="Relay", received_from="my-bot"
    )
    fake, base_url = scripted
    fake.answers.append(json_response({"id": "Ab1Cd3Ef5Gh7Ij9Kl"}))
    scripted_client = env.client(identity=identity, base_url=base_url)
    await scripted_client.send_agent_message("hf_2", "hi")
    assert json.loads(fake.requests[0][3]) == {
        "visitorId": "hf_2",
        "text": "hi",
        "receivedFrom": "my-bot",
        "agentEmail": "relay@shop.example.com",
        "agentName": "Relay",
    }

    client = env.client(identity=identity)
    first = await client.send_agent_message("hf_2", "one")
    second = await client.send_agent_message("hf_2", "two")
    thread = env.sandbox.messages("hf_2")
    assert [m["id"] for m in thread] == [first.id, second.id]
    agent_id = thread[0]["agentId"]
    assert isinstance(agent_id, str)
    assert re.fullmatch(r"[A-Za-z0-9]{17}", agent_id)
    assert agent_id != AGENT_ID
    assert thread[1]["agentId"] == agent_id  # Brevo keeps one agent per e-mail
    assert [m["agentName"] for m in thread] == ["Relay", "Relay"]
    assert [m["receivedFrom"] for m in thread] == ["my-bot", "my-bot"]


async def test_missing_created_at_defaults_to_now(scripted: tuple[Scripted, str]) -> None:
    fake, base_url = scripted
    fake.answers.append(json_response({"id": "NoTimeId000000001", "createdAt": "yesterday"}))
    client = BrevoClient(base_url, API_KEY, AgentIdentity(agent_id=AGENT_ID))
    try:
        before = int(time.time() * 1000)
        sent = await client.send_agent_message("hf_3", "x")
        after = int(time.time() * 1000)
    finally:
        await client.aclose()
    assert sent.id == "NoTimeId000000001"
    assert before <= sent.created_at_ms <= after


@pytest.mark.parametrize(
    "answer",
    [
        json_response({"type": "agent", "text": "x"}),
        json_response({"id": 12345}),
        json_response(["not", "an", "object"]),
        Response("OK", status_code=200, media_type="text/plain"),
    ],
)
async def test_answer_without_message_id_is_unavailable(
    scripted: tuple[Scripted, str], answer: Response
) -> None:
    fake, base_url = scripted
    fake.answers.append(answer)
    client = BrevoClient(base_url, API_KEY, AgentIdentity(agent_id=AGENT_ID))
    try:
        with pytest.raises(BrevoUnavailable, match="Brevo answered without a message id"):
            await client.send_agent_message("hf_4", "x")
    finally:
        await client.aclose()
    assert len(fake.requests) == 1  # not retried: the message may be posted already


async def test_identity_without_agent_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="agent_id, or agent_email and agent_name"):
        BrevoClient("http://127.0.0.1:9/v3", API_KEY, AgentIdentity(agent_email="a@b.c"))


# --- retries ----------------------------------------------------------------------------


async def test_rate_limit_then_server_error_then_success(env: Env) -> None:
    env.sandbox.inject_faults(
        Fault(status=429, headers={"x-sib-ratelimit-reset": "2"}),
        Fault(status=500),
    )
    client = env.client()
    sent = await client.send_agent_message("hf_retry", "Botpress User: hello")

    assert [m["id"] for m in env.sandbox.messages("hf_retry")] == [sent.id]
    assert env.sandbox.rest_calls == [
        ("POST", SEND_PATH, 429),
        ("POST", SEND_PATH, 500),
        ("POST", SEND_PATH, 200),
    ]
    jitter, backoff = replay_uniform(0.25, 0.5)  # reset jitter, then attempt 2 backoff
    assert env.sleep.delays == [2.0 + jitter, backoff]
    assert 2.0 <= env.sleep.delays[0] <= 2.25
    assert 0.0 <= env.sleep.delays[1] <= 0.5


async def test_rate_limit_reset_too_long_fails_at_once(env: Env) -> None:
    env.sandbox.inject_faults(Fault(status=429, headers={"x-sib-ratelimit-reset": "120"}))
    client = env.client()
    with pytest.raises(BrevoRateLimited) as caught:
        await client.send_agent_message("hf_rl", "x")
    assert caught.value.retry_after_s == 120.0
    assert "retry after 120 s" in str(caught.value)
    assert env.sandbox.rest_calls == [("POST", SEND_PATH, 429)]
    assert env.sleep.delays == []
    assert env.sandbox.messages("hf_rl") == []


async def test_rate_limit_on_every_attempt(env: Env) -> None:
    env.sandbox.inject_faults(
        *[Fault(status=429, headers={"x-sib-ratelimit-reset": "0"}) for _ in range(4)]
    )
    client = env.client()
    with pytest.raises(BrevoRateLimited) as caught:
        await client.send_agent_message("hf_rl4", "x")
    assert caught.value.retry_after_s == 0.0
    assert [status for _, _, status in env.sandbox.rest_calls] == [429, 429, 429, 429]
    assert env.sleep.delays == replay_uniform(0.25, 0.25, 0.25)


async def test_rate_limit_falls_back_to_retry_after(env: Env) -> None:
    env.sandbox.inject_faults(
        Fault(status=429, headers={"retry-after": "5"}),
        Fault(status=429, headers={"retry-after": "5"}),
    )
    client = env.client(retry=RetryPolicy(max_attempts=2))
    with pytest.raises(BrevoRateLimited) as caught:
        await client.send_agent_message("hf_ra", "x")
    assert caught.value.retry_after_s == 5.0
    assert env.sleep.delays == [5.0 + replay_uniform(0.25)[0]]


async def test_persistent_server_error_gives_up_after_max_attempts(env: Env) -> None:
    env.sandbox.inject_faults(*[Fault(status=500) for _ in range(5)])
    client = env.client()
    with pytest.raises(BrevoUnavailable) as caught:
        await client.send_agent_message("hf_500", "x")
    message = str(caught.value)
    assert "HTTP 500" in message
    assert "after 4 attempts" in message
    assert "retry later" in message
    assert '"Internal server error"' in message
    assert env.sandbox.rest_calls == [("POST", SEND_PATH, 500)] * 4
    assert env.sleep.delays == replay_uniform(0.25, 0.5, 1.0)
    assert env.sandbox.messages("hf_500") == []


async def test_timeout_is_retried(env: Env) -> None:
    env.sandbox.inject_faults(Fault(status=500, delay_s=0.6))
    client = env.client(timeout_s=0.15)
    sent = await client.send_agent_message("hf_slow", "x")

    assert [m["id"] for m in env.sandbox.messages("hf_slow")] == [sent.id]
    assert env.sleep.delays == replay_uniform(0.25)
    for _ in range(100):  # the slow call answers (to nobody) after its delay
        if len(env.sandbox.rest_calls) == 2:
            break
        await asyncio.sleep(0.02)
    assert env.sandbox.rest_calls == [("POST", SEND_PATH, 500), ("POST", SEND_PATH, 200)]


async def test_persistent_timeouts_are_unavailable(env: Env) -> None:
    env.sandbox.inject_faults(Fault(delay_s=0.4), Fault(delay_s=0.4))
    client = env.client(timeout_s=0.1, retry=RetryPolicy(max_attempts=2))
    expected = r"after 2 attempts \(no answer within 0\.1 s \(timeout\)\)"
    with pytest.raises(BrevoUnavailable, match=expected):
        await client.send_agent_message("hf_slow2", "x")


async def test_connection_refused_is_unavailable(env: Env) -> None:
    base_url = f"http://127.0.0.1:{free_port()}/v3"
    client = env.client(base_url=base_url, retry=RetryPolicy(max_attempts=3))
    with pytest.raises(BrevoUnavailable) as caught:
        await client.send_agent_message("hf_down", "x")
    message = str(caught.value)
    assert message.startswith(f"Could not reach Brevo at {base_url} for POST")
    assert "after 3 attempts (ClientConnectorError: Cannot connect to host 127.0.0.1:" in message
    assert len(env.sleep.delays) == 2


def clear_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


async def test_posts_through_the_proxy_the_environment_names(
    scripted: tuple[Scripted, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, base_url = scripted  # the scripted server plays the proxy
    clear_proxy_environment(monkeypatch)
    monkeypatch.setenv("HTTP_PROXY", base_url.removesuffix("/v3"))
    fake.answers.append(json_response({"id": "ViaTheProxy000001"}))
    # brevo.invalid resolves nowhere: only the proxy can have carried the post.
    client = BrevoClient("http://brevo.invalid/v3", API_KEY, AgentIdentity(agent_id=AGENT_ID))
    try:
        sent = await client.send_agent_message("hf_1", "hello")
    finally:
        await client.aclose()
    assert sent.id == "ViaTheProxy000001"
    [(method, path, headers, _)] = fake.requests
    assert (method, path, headers["host"]) == ("POST", SEND_PATH, "brevo.invalid")
    assert headers["api-key"] == API_KEY


async def test_no_proxy_reaches_brevo_directly(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    clear_proxy_environment(monkeypatch)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")  # nobody listens
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    sent = await env.client().send_agent_message("hf_direct", "x")
    assert [m["id"] for m in env.sandbox.messages("hf_direct")] == [sent.id]


async def test_server_error_with_html_body_then_success(scripted: tuple[Scripted, str]) -> None:
    fake, base_url = scripted
    fake.answers += [
        Response("<html><body>502 Bad Gateway</body></html>", status_code=502),
        json_response({"id": "AfterTheStorm0001"}),
    ]
    sleep = RecordingSleep()
    client = BrevoClient(
        base_url, API_KEY, AgentIdentity(agent_id=AGENT_ID), sleep=sleep, rng=random.Random(SEED)
    )
    try:
        sent = await client.send_agent_message("hf_5", "x")
    finally:
        await client.aclose()
    assert sent.id == "AfterTheStorm0001"
    assert sleep.delays == replay_uniform(0.25)
    assert len(fake.requests) == 2


# --- refusals ---------------------------------------------------------------------------


async def test_wrong_key_is_auth_rejected_without_leaking_it(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong_key = "xkeysib-ffffffffffffffff-WrongKeySecret"
    client = env.client(api_key=wrong_key)
    with pytest.raises(BrevoAuthRejected) as caught:
        await client.send_agent_message("hf_auth", "x")
    message = str(caught.value)
    assert "API key" in message
    assert "IP address" in message
    assert "Security -> Authorised IPs" in message
    assert '"Key not found"' in message
    assert "\n" not in message
    for text in (message, repr(caught.value), caplog.text):
        assert wrong_key not in text
        assert API_KEY not in text
    assert env.sandbox.rest_calls == [("POST", SEND_PATH, 401)]  # no retry
    assert env.sleep.delays == []


async def test_ip_block_says_it_is_an_ip_block(env: Env) -> None:
    ip_message = (
        "We have detected you are using an unrecognised IP address 203.0.113.9. If you "
        "performed this action make sure to add the new IP address in this link: "
        "https://app.brevo.com/security/authorised_ips"
    )
    env.sandbox.inject_faults(
        Fault(status=401, body={"code": "unauthorized", "message": ip_message})
    )
    client = env.client()
    with pytest.raises(BrevoAuthRejected) as caught:
        await client.send_agent_message("hf_ip", "x")
    message = str(caught.value)
    assert "this server's IP address is not authorised" in message
    assert "Security -> Authorised IPs" in message
    assert "203.0.113.9" in message
    assert API_KEY not in message


async def test_forbidden_is_auth_rejected(env: Env) -> None:
    env.sandbox.inject_faults(Fault(status=403))
    client = env.client()
    with pytest.raises(BrevoAuthRejected, match=r"HTTP 403 .*Permission denied"):
        await client.send_agent_message("hf_403", "x")
    assert len(env.sandbox.rest_calls) == 1


async def test_bad_request_quotes_brevo_message(env: Env) -> None:
    client = env.client()
    with pytest.raises(BrevoRejected) as caught:
        await client.send_agent_message("", "x")  # the real sandbox validation answers 400
    message = str(caught.value)
    assert 'missing_parameter: "visitorId is missing"' in message
    assert "HTTP 400" in message
    assert env.sandbox.rest_calls == [("POST", SEND_PATH, 400)]
    assert env.sleep.delays == []


async def test_not_found_is_rejected(env: Env) -> None:
    env.sandbox.inject_faults(Fault(status=404))
    client = env.client()
    with pytest.raises(BrevoRejected, match=r"HTTP 404 .*Document not found"):
        await client.send_agent_message("hf_404", "x")


async def test_non_json_error_body_is_quoted(scripted: tuple[Scripted, str]) -> None:
    fake, base_url = scripted
    fake.answers.append(Response("Bad\nRequest  from proxy", status_code=400))
    client = BrevoClient(base_url, API_KEY, AgentIdentity(agent_id=AGENT_ID))
    try:
        with pytest.raises(BrevoRejected) as caught:
            await client.send_agent_message("hf_6", "x")
    finally:
        await client.aclose()
    assert '"Bad Request from proxy"' in str(caught.value)


# --- account ----------------------------------------------------------------------------


async def test_check_account(env: Env) -> None:
    assert await env.client().check_account() == (
        "account sandbox@brevo-sandbox.invalid (Brevo sandbox)"
    )
    assert env.sandbox.rest_calls == [("GET", "/v3/account", 200)]


async def test_check_account_refused(env: Env) -> None:
    with pytest.raises(BrevoAuthRejected, match="API key") as caught:
        await env.client(api_key="xkeysib-not-this-one").check_account()
    assert "xkeysib-not-this-one" not in str(caught.value)
    assert env.sandbox.rest_calls == [("GET", "/v3/account", 401)]


# --- retry_delay ------------------------------------------------------------------------


async def test_backoff_bounds_and_full_jitter() -> None:
    policy = RetryPolicy(base_delay_s=0.25, max_delay_s=8.0)
    ceilings = {1: 0.25, 2: 0.5, 3: 1.0, 4: 2.0, 5: 4.0, 6: 8.0, 7: 8.0, 20: 8.0}
    rng = random.Random(1)
    for attempt, ceiling in ceilings.items():
        delays = [retry_delay(attempt, policy, None, rng) for _ in range(300)]
        assert all(d is not None and 0.0 <= d <= ceiling for d in delays)
        assert max(d for d in delays if d is not None) > ceiling * 0.9  # spread over the range
        assert min(d for d in delays if d is not None) < ceiling * 0.1
    assert retry_delay(3, policy, None, random.Random(SEED)) == replay_uniform(1.0)[0]
    huge = retry_delay(10_000, policy, None, random.Random(SEED))
    assert huge is not None
    assert 0.0 <= huge <= 8.0


async def test_rate_limit_reset_is_honoured() -> None:
    policy = RetryPolicy()
    assert retry_delay(1, policy, "2", random.Random(SEED)) == 2.0 + replay_uniform(0.25)[0]
    assert retry_delay(3, policy, " 2.5 ", random.Random(SEED)) == 2.5 + replay_uniform(0.25)[0]
    zero = retry_delay(4, policy, "0", random.Random(SEED))
    assert zero is not None
    assert 0.0 <= zero <= 0.25
    assert retry_delay(1, policy, "30", random.Random(SEED)) == 30.0 + replay_uniform(0.25)[0]


@pytest.mark.parametrize("header", ["30.5", "120", "3600", "inf"])
async def test_rate_limit_reset_too_long_gives_up(header: str) -> None:
    assert retry_delay(1, RetryPolicy(), header, random.Random(SEED)) is None


@pytest.mark.parametrize("header", ["soon", "", "-1", "nan", "1e", "Wed, 21 Oct 2015"])
async def test_garbage_reset_header_means_plain_backoff(header: str) -> None:
    policy = RetryPolicy()
    assert retry_delay(2, policy, header, random.Random(SEED)) == replay_uniform(0.5)[0]
