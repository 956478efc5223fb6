"""The Brevo sandbox: Brevo's REST and webhook shapes, faults and the simulated agent."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from support import Dispatch

from service.brevo.client import AgentIdentity, BrevoClient
from service.brevo.sandbox import (
    GOODBYE_TEXT,
    GREETING_TEXT,
    SANDBOX_AGENT,
    BrevoSandbox,
    Fault,
    noted_text,
)
from service.http_server import RunningHttpServer, start_http_server

API_KEY = "xkeysib-sandbox-test-key"
HOOK_TOKEN = "s3cr3t-hook-token-f00"
AGENT_ID = "Bridg3AgentId0001"
SERVICE_AGENT = {"id": AGENT_ID, "name": "Support Bot", "email": "bot@shop.example.com"}
SERVICE_AGENT_ENTRY = {**SERVICE_AGENT, "userpic": None}
SEND_PATH = "/v3/conversations/messages"

FIXTURES = Path(__file__).parent / "fixtures" / "brevo"


def fixture(name: str) -> dict[str, object]:
    body = json.loads((FIXTURES / name).read_text(encoding="utf-8"))
    assert isinstance(body, dict)
    return body


def first_message(body: Mapping[str, object]) -> Mapping[str, object]:
    items = body["messages"]
    assert isinstance(items, list)
    assert isinstance(items[0], dict)
    return items[0]


def sub(body: Mapping[str, object], key: str) -> Mapping[str, object]:
    value = body[key]
    assert isinstance(value, dict)
    return value


# The shapes the sandbox must speak, taken from Brevo's fixtures.
FIXTURE_401 = fixture("rest_error_401.json")
REST_MESSAGE_KEYS = set(fixture("rest_send_message_response.json"))
STARTED_KEYS = set(fixture("conversation_started.json"))
FRAGMENT_KEYS = set(fixture("fragment_no_agent.json"))
TRANSCRIPT_KEYS = set(fixture("transcript.json"))
ECHO_KEYS = set(first_message(fixture("fragment_no_agent.json")))  # the service's own echo
AGENT_MESSAGE_KEYS = set(first_message(fixture("fragment_reply_with_echo.json"))) - {"receivedFrom"}
VISITOR_KEYS = set(sub(fixture("fragment_no_agent.json"), "visitor"))
TRANSCRIPT_VISITOR_KEYS = set(sub(fixture("transcript.json"), "visitor"))
FILE_FIXTURE = sub(first_message(fixture("fragment_file.json")), "file")
BREVO_ID = re.compile(r"[A-Za-z0-9]{17}")

# One event loop and one pair of HTTP servers for the whole module: stopping a uvicorn
# server takes ~0.15 s, too slow to do in every test. Each test gets its own sandbox.
pytestmark = pytest.mark.asyncio(loop_scope="module")

Body = dict[str, object]


@dataclass
class Receiver:
    """The webhook endpoint: records every body; answers the scripted statuses, then 200."""

    statuses: list[int] = field(default_factory=list)
    bodies: list[Body] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    async def hook(self, request: Request) -> Response:
        body = await request.json()
        assert isinstance(body, dict)
        self.bodies.append(body)
        self.paths.append(request.url.path)
        return Response(status_code=self.statuses.pop(0) if self.statuses else 200)

    @property
    def app(self) -> Starlette:
        return Starlette(routes=[Route("/hooks/{token}", self.hook, methods=["POST"])])


@dataclass
class Harness:
    sandbox: BrevoSandbox
    server: RunningHttpServer
    receiver: Receiver
    http: httpx.AsyncClient  # raw REST calls, with the right key

    def events(self) -> list[tuple[object, ...]]:
        """(eventName, texts of the messages) of every delivered webhook, in order."""
        summary: list[tuple[object, ...]] = []
        for body in self.receiver.bodies:
            if body["eventName"] == "conversationStarted":
                summary.append((body["eventName"], message(body["message"])["text"]))
            else:
                summary.append(
                    (body["eventName"], *[m["text"] for m in messages(body["messages"])])
                )
        return summary

    async def post(self, visitor_id: str, text: str, **extra: str) -> Body:
        answer = await self.http.post(
            "/v3/conversations/messages",
            json={"visitorId": visitor_id, "text": text, **extra},
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert isinstance(body, dict)
        return body


def message(value: object) -> Mapping[str, object]:
    assert isinstance(value, dict)
    return value


def messages(value: object) -> list[Mapping[str, object]]:
    assert isinstance(value, list)
    return [message(item) for item in value]


@dataclass
class Servers:
    sandbox: Dispatch
    sandbox_server: RunningHttpServer
    hooks: Dispatch
    hooks_server: RunningHttpServer

    @property
    def hook_url(self) -> str:
        return f"{self.hooks_server.base_url}/hooks/{HOOK_TOKEN}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def servers() -> AsyncIterator[Servers]:
    sandbox, hooks = Dispatch(), Dispatch()
    sandbox_server = await start_http_server(sandbox, "127.0.0.1", 0)
    hooks_server = await start_http_server(hooks, "127.0.0.1", 0)
    try:
        yield Servers(sandbox, sandbox_server, hooks, hooks_server)
    finally:
        await asyncio.gather(sandbox_server.stop(), hooks_server.stop())


@contextlib.asynccontextmanager
async def running(
    servers: Servers,
    *,
    auto_agent: bool = False,
    agent_online: bool = True,
    receiver: Receiver | None = None,
) -> AsyncIterator[Harness]:
    receiver = receiver if receiver is not None else Receiver()
    sandbox = BrevoSandbox(
        api_key=API_KEY,
        webhook_url=servers.hook_url,
        auto_agent=auto_agent,
        agent_reply_delay_s=0.05,
        agent_online=agent_online,
        service_agent=SERVICE_AGENT,
    )
    servers.sandbox.target = sandbox.app
    servers.hooks.target = receiver.app
    http = httpx.AsyncClient(base_url=servers.sandbox_server.base_url, headers={"api-key": API_KEY})
    try:
        yield Harness(sandbox=sandbox, server=servers.sandbox_server, receiver=receiver, http=http)
    finally:
        await http.aclose()
        await sandbox.aclose()


# --- REST -------------------------------------------------------------------------------


async def test_first_message_starts_conversation_then_echoes_it(servers: Servers) -> None:
    async with running(servers) as h:
        before = int(time.time() * 1000)
        answer = await h.post(
            "hf_first", "*New handoff request*", agentId=AGENT_ID, receivedFrom="handoff-service"
        )
        after = int(time.time() * 1000)
        await h.sandbox.wait_idle()

        assert set(answer) == REST_MESSAGE_KEYS
        message_id = answer["id"]
        assert isinstance(message_id, str)
        assert BREVO_ID.fullmatch(message_id)
        created = answer["createdAt"]
        assert isinstance(created, int)
        assert before <= created <= after
        assert {k: v for k, v in answer.items() if k not in ("id", "createdAt")} == {
            "type": "agent",
            "text": "*New handoff request*",
            "visitorId": "hf_first",
            "agentId": AGENT_ID,
            "agentName": "Support Bot",
            "receivedFrom": "handoff-service",
        }

        started, fragment = h.receiver.bodies
        assert set(started) == STARTED_KEYS
        assert started["eventName"] == "conversationStarted"
        conversation_id = started["conversationId"]
        assert isinstance(conversation_id, str)
        assert BREVO_ID.fullmatch(conversation_id)
        assert started["isNoAvailableAgent"] is False
        assert started["conversationStartPage"] == {"link": "", "title": ""}
        visitor = message(started["visitor"])
        assert set(visitor) == VISITOR_KEYS
        assert visitor["id"] == "hf_first"
        assert visitor["source"] == "api"
        echo = {
            "id": message_id,
            "type": "agent",
            "text": "*New handoff request*",
            "html": "*New handoff request*",
            "createdAt": created,
            "agentId": AGENT_ID,
            "agentName": "Support Bot",
            "agentUserpic": None,
            "receivedFrom": "handoff-service",
        }
        assert started["message"] == echo

        assert set(fragment) == FRAGMENT_KEYS
        assert fragment["eventName"] == "conversationFragment"
        assert fragment["conversationId"] == conversation_id
        assert fragment["isNoAvailableAgent"] is False
        assert fragment["messages"] == [echo]
        assert set(echo) == ECHO_KEYS
        assert fragment["agents"] == [SERVICE_AGENT_ENTRY]
        assert fragment["visitor"] == visitor
        assert h.receiver.paths == [f"/hooks/{HOOK_TOKEN}"] * 2

        # A second message is only a fragment, in the same conversation.
        second = await h.post("hf_first", "more", agentId=AGENT_ID, receivedFrom="handoff-service")
        await h.sandbox.wait_idle()
        assert len(h.receiver.bodies) == 3
        third = h.receiver.bodies[2]
        assert third["eventName"] == "conversationFragment"
        assert third["conversationId"] == conversation_id
        assert [m["id"] for m in messages(third["messages"])] == [second["id"]]
        assert [m["id"] for m in h.sandbox.messages("hf_first")] == [message_id, second["id"]]


async def test_conversation_id_is_stable_per_visitor(servers: Servers) -> None:
    ids: list[object] = []
    for _ in range(2):
        async with running(servers) as h:
            await h.post("hf_same", "x", agentId=AGENT_ID)
            await h.post("hf_other", "x", agentId=AGENT_ID)
            await h.sandbox.wait_idle()
            ids.append([b["conversationId"] for b in h.receiver.bodies[::2]])
    assert ids[0] == ids[1]
    assert isinstance(ids[0], list)
    assert ids[0][0] != ids[0][1]


async def test_get_message_by_id(servers: Servers) -> None:
    async with running(servers) as h:
        posted = await h.post("hf_get", "hello", agentId=AGENT_ID, receivedFrom="handoff-service")
        found = await h.http.get(f"/v3/conversations/messages/{posted['id']}")
        assert (found.status_code, found.json()) == (200, posted)
        missing = await h.http.get("/v3/conversations/messages/NoSuchMessage0001")
        assert (missing.status_code, missing.json()) == (
            404,
            {"code": "document_not_found", "message": "Message not found"},
        )


MISSING, INVALID = "missing_parameter", "invalid_parameter"
BY_ID = {"agentId": AGENT_ID}
VT = {"visitorId": "v", "text": "t"}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, (MISSING, "visitorId is missing")),
        ({"text": "t", **BY_ID}, (MISSING, "visitorId is missing")),
        ({"visitorId": "", "text": "t", **BY_ID}, (MISSING, "visitorId is missing")),
        ({"visitorId": 42, "text": "t", **BY_ID}, (INVALID, "visitorId must be a string")),
        ({"visitorId": "v", **BY_ID}, (MISSING, "text is missing")),
        ({"visitorId": "v", "text": "", **BY_ID}, (MISSING, "text is missing")),
        (VT, (MISSING, "agentId is missing (or agentEmail and agentName)")),
        ({**VT, "agentEmail": "a@b.c", "agentName": "A"}, (MISSING, "receivedFrom is missing")),
        ({**VT, "agentName": "A", "receivedFrom": "r"}, (MISSING, "agentEmail is missing")),
        ({**VT, "agentEmail": "a@b.c", "receivedFrom": "r"}, (MISSING, "agentName is missing")),
        ({**VT, "agentId": 7}, (INVALID, "agentId must be a string")),
        (["visitorId", "v"], ("bad_request", "The request body must be a JSON object")),
    ],
)
async def test_validation_errors_have_brevo_shape(
    servers: Servers, body: object, expected: tuple[str, str]
) -> None:
    async with running(servers) as h:
        answer = await h.http.post(SEND_PATH, json=body)
        await h.sandbox.wait_idle()
        assert answer.status_code == 400
        assert answer.json() == {"code": expected[0], "message": expected[1]}
        assert h.sandbox.rest_calls == [("POST", SEND_PATH, 400)]
        assert h.receiver.bodies == []
        assert h.sandbox.messages("v") == []


async def test_non_json_body_is_bad_request(servers: Servers) -> None:
    async with running(servers) as h:
        answer = await h.http.post(SEND_PATH, content=b"visitorId=v&text=t")
        assert answer.status_code == 400
        body = answer.json()
        assert set(body) == {"code", "message"}
        assert body["code"] == "bad_request"


async def test_agent_email_variant_is_accepted(servers: Servers) -> None:
    async with running(servers) as h:
        answer = await h.post(
            "hf_mail",
            "x",
            agentEmail="bot@shop.example.com",
            agentName="Other name",
            receivedFrom="handoff-service",
        )
        # Brevo knows this e-mail: it is the service agent's.
        assert (answer["agentId"], answer["agentName"]) == (AGENT_ID, "Support Bot")
        other = await h.post(
            "hf_mail",
            "y",
            agentEmail="new@shop.example.com",
            agentName="Newcomer",
            receivedFrom="handoff-service",
        )
        assert other["agentName"] == "Newcomer"
        assert isinstance(other["agentId"], str)
        assert BREVO_ID.fullmatch(other["agentId"])


@pytest.mark.parametrize("headers", [{"api-key": "xkeysib-wrong"}, {}])
async def test_wrong_or_missing_key_is_brevo_401(servers: Servers, headers: dict[str, str]) -> None:
    async with running(servers) as h:
        async with httpx.AsyncClient(base_url=h.server.base_url, headers=headers) as raw:
            sent = await raw.post(
                SEND_PATH, json={"visitorId": "v", "text": "t", "agentId": AGENT_ID}
            )
            account = await raw.get("/v3/account")
        assert (sent.status_code, sent.json()) == (401, FIXTURE_401)
        assert (account.status_code, account.json()) == (401, FIXTURE_401)
        assert h.sandbox.rest_calls == [("POST", SEND_PATH, 401), ("GET", "/v3/account", 401)]
        assert h.sandbox.messages("v") == []


async def test_account(servers: Servers) -> None:
    async with running(servers) as h:
        answer = await h.http.get("/v3/account")
        assert answer.status_code == 200
        assert answer.json() == {
            "email": "sandbox@brevo-sandbox.invalid",
            "companyName": "Brevo sandbox",
            "plan": [{"type": "free"}],
        }


async def test_unknown_endpoint_is_brevo_404(servers: Servers) -> None:
    async with running(servers) as h:
        answer = await h.http.post("/v3/conversations/pushedMessages", json={})
        assert answer.status_code == 404
        assert answer.json()["code"] == "not_found"
        assert h.sandbox.rest_calls == [("POST", "/v3/conversations/pushedMessages", 404)]


async def test_faults_replace_the_next_answers_in_order(servers: Servers) -> None:
    async with running(servers) as h:
        h.sandbox.inject_faults(
            Fault(status=503),
            Fault(status=429, headers={"x-sib-ratelimit-reset": "7"}),
            Fault(status=400, body={"code": "custom", "message": "Injected"}),
        )
        good = {"visitorId": "hf_f", "text": "t", "agentId": AGENT_ID}
        first = await h.http.post(SEND_PATH, json=good)
        second = await h.http.get("/v3/account")  # faults apply to any /v3 endpoint
        third = await h.http.post(SEND_PATH, json=good)
        fourth = await h.http.post(SEND_PATH, json=good)
        await h.sandbox.wait_idle()

        assert (first.status_code, first.json()) == (
            503,
            {"code": "service_unavailable", "message": "Service temporarily unavailable"},
        )
        assert (second.status_code, second.json()["code"]) == (429, "too_many_requests")
        assert second.headers["x-sib-ratelimit-reset"] == "7"
        assert (third.status_code, third.json()) == (400, {"code": "custom", "message": "Injected"})
        assert fourth.status_code == 200
        # Faulted calls had no side effect: one message, one conversation.
        assert [m["id"] for m in h.sandbox.messages("hf_f")] == [fourth.json()["id"]]
        assert [b["eventName"] for b in h.receiver.bodies] == [
            "conversationStarted",
            "conversationFragment",
        ]
        assert h.sandbox.rest_calls == [
            ("POST", SEND_PATH, 503),
            ("GET", "/v3/account", 429),
            ("POST", SEND_PATH, 400),
            ("POST", SEND_PATH, 200),
        ]


async def test_fault_comes_before_key_check(servers: Servers) -> None:
    async with running(servers) as h:
        h.sandbox.inject_faults(Fault(status=500))
        async with httpx.AsyncClient(base_url=h.server.base_url) as keyless:
            assert (await keyless.get("/v3/account")).status_code == 500
            assert (await keyless.get("/v3/account")).status_code == 401


# --- simulated agent --------------------------------------------------------------------


async def test_simulated_agent_greets_replies_and_closes_on_bye(servers: Servers) -> None:
    async with running(servers, auto_agent=True) as h:
        client = BrevoClient(f"{h.server.base_url}/v3", API_KEY, AgentIdentity(agent_id=AGENT_ID))
        try:
            sent = [await client.send_agent_message("hf_sam", "*New handoff request*")]
            await h.sandbox.wait_idle()
            for text in (
                "Botpress User: my order is late",
                "The user is on a mobile phone",  # no prefix: no reply
                "Botpress User: ok thanks, BYE",
            ):
                sent.append(await client.send_agent_message("hf_sam", text))
                await h.sandbox.wait_idle()
        finally:
            await client.aclose()

        thread = h.sandbox.messages("hf_sam")
        assert [(m["agentId"], m["text"]) for m in thread] == [
            (AGENT_ID, "*New handoff request*"),
            (SANDBOX_AGENT["id"], GREETING_TEXT),
            (AGENT_ID, "Botpress User: my order is late"),
            (SANDBOX_AGENT["id"], noted_text("my order is late")),
            (AGENT_ID, "The user is on a mobile phone"),
            (AGENT_ID, "Botpress User: ok thanks, BYE"),
            (SANDBOX_AGENT["id"], GOODBYE_TEXT),
        ]
        assert [m["id"] for m in thread if m["agentId"] == AGENT_ID] == [s.id for s in sent]
        assert h.events() == [
            ("conversationStarted", "*New handoff request*"),
            ("conversationFragment", "*New handoff request*"),
            ("conversationFragment", GREETING_TEXT),
            ("conversationFragment", "Botpress User: my order is late"),
            ("conversationFragment", noted_text("my order is late")),
            ("conversationFragment", "The user is on a mobile phone"),
            ("conversationFragment", "Botpress User: ok thanks, BYE"),
            ("conversationFragment", GOODBYE_TEXT),
            ("conversationTranscript", *[m["text"] for m in thread]),
        ]

        greeting_fragment = h.receiver.bodies[2]
        assert greeting_fragment["agents"] == [SANDBOX_AGENT]
        [greeting] = messages(greeting_fragment["messages"])
        assert set(greeting) == AGENT_MESSAGE_KEYS  # no receivedFrom on a human's message
        assert (greeting["agentName"], greeting["agentUserpic"]) == (
            SANDBOX_AGENT["name"],
            SANDBOX_AGENT["userpic"],
        )

        transcript = h.receiver.bodies[-1]
        assert set(transcript) == TRANSCRIPT_KEYS
        assert transcript["conversationId"] == h.receiver.bodies[0]["conversationId"]
        assert transcript["messages"] == thread
        assert transcript["missedMessagesCount"] == 0
        assert transcript["agents"] == [SERVICE_AGENT_ENTRY, SANDBOX_AGENT]
        assert transcript["conversationStartPage"] == {"link": "", "title": ""}
        visitor = message(transcript["visitor"])
        assert set(visitor) == TRANSCRIPT_VISITOR_KEYS
        assert (visitor["id"], visitor["isBanned"]) == ("hf_sam", False)

        # After the transcript the chat is over: the next message opens a new one.
        again = await h.post("hf_sam", "*Another handoff*", agentId=AGENT_ID)
        await h.sandbox.wait_idle()
        assert h.events()[9:] == [
            ("conversationStarted", "*Another handoff*"),
            ("conversationFragment", "*Another handoff*"),
            ("conversationFragment", GREETING_TEXT),
        ]
        assert h.receiver.bodies[9]["conversationId"] == transcript["conversationId"]
        assert message(h.receiver.bodies[9]["message"])["id"] == again["id"]


async def test_agent_offline_means_no_available_agent_and_no_reply(servers: Servers) -> None:
    async with running(servers, auto_agent=True, agent_online=False) as h:
        await h.post("hf_off", "*New handoff request*", agentId=AGENT_ID)
        await h.post("hf_off", "Botpress User: anyone there?", agentId=AGENT_ID)
        await h.sandbox.wait_idle()

        assert h.events() == [
            ("conversationStarted", "*New handoff request*"),
            ("conversationFragment", "*New handoff request*"),
            ("conversationFragment", "Botpress User: anyone there?"),
        ]
        assert [b["isNoAvailableAgent"] for b in h.receiver.bodies] == [True, True, True]
        assert len(h.sandbox.messages("hf_off")) == 2

        # Sam comes online: he greets the chat that waited for him.
        h.sandbox.set_agent_online(True)
        await h.sandbox.wait_idle()
        assert h.events()[3:] == [("conversationFragment", GREETING_TEXT)]
        assert h.receiver.bodies[3]["isNoAvailableAgent"] is False


async def test_agent_sends_a_file(servers: Servers) -> None:
    async with running(servers) as h:
        returned = await h.sandbox.agent_says(
            "hf_file",
            "return-label.png",
            file={
                "size": 48213,
                "link": "https://files.example.net/u/3a9b7c/return-label.png",
                "imageInfo": {"width": 800, "height": 1131},
            },
        )
        await h.sandbox.wait_idle()

        expected_file = {
            "name": "return-label.png",
            "size": 48213,
            "mimeType": "image/png",
            "isAllowedFileType": True,
            "isImage": True,
            "isSticker": False,
            "link": "https://files.example.net/u/3a9b7c/return-label.png",
            "imageInfo": {
                "width": 800,
                "height": 1131,
                "previewLink": "https://files.example.net/u/3a9b7c/return-label.png",
            },
        }
        assert returned["file"] == expected_file
        assert set(expected_file) == set(FILE_FIXTURE)  # the newer spelling, all of it
        assert set(sub(expected_file, "imageInfo")) == set(sub(FILE_FIXTURE, "imageInfo"))
        assert returned["text"] == "return-label.png"
        # An agent who writes first starts the conversation too.
        started, fragment = h.receiver.bodies
        assert started["eventName"] == "conversationStarted"
        assert fragment["messages"] == [returned]
        assert set(returned) == AGENT_MESSAGE_KEYS | {"file"}
        assert fragment["agents"] == [SANDBOX_AGENT]
        assert h.sandbox.messages("hf_file") == [returned]


async def test_agent_sends_a_non_image_file_as_another_agent(servers: Servers) -> None:
    marta = {"id": "HmN3bV7cX2zL9kJ4q", "name": "Marta", "email": "marta@shop.example.com"}
    async with running(servers) as h:
        returned = await h.sandbox.agent_says(
            "hf_pdf", "invoice.pdf", agent=marta, file={"name": "invoice.pdf"}
        )
        await h.sandbox.wait_idle()
        file = message(returned["file"])
        assert (file["mimeType"], file["isImage"]) == ("application/pdf", False)
        assert "imageInfo" not in file
        assert (returned["agentId"], returned["agentName"], returned["agentUserpic"]) == (
            "HmN3bV7cX2zL9kJ4q",
            "Marta",
            None,
        )
        assert h.receiver.bodies[1]["agents"] == [{**marta, "userpic": None}]


async def test_close_without_open_chat_is_lookup_error(servers: Servers) -> None:
    async with running(servers) as h:
        with pytest.raises(LookupError):
            await h.sandbox.close_conversation("hf_nobody")


# --- control routes ---------------------------------------------------------------------


async def test_control_routes(servers: Servers) -> None:
    async with running(servers) as h:
        await h.post("hf_ctl", "*New handoff request*", agentId=AGENT_ID)
        said = await h.http.post(
            "/_sandbox/agent/messages", json={"visitorId": "hf_ctl", "text": "Hello from Sam"}
        )
        assert said.status_code == 200
        assert said.json()["agentId"] == SANDBOX_AGENT["id"]

        listed = await h.http.get("/_sandbox/messages", params={"visitorId": "hf_ctl"})
        assert [m["text"] for m in listed.json()["messages"]] == [
            "*New handoff request*",
            "Hello from Sam",
        ]

        offline = await h.http.post("/_sandbox/agent/online", json={"online": False})
        assert offline.json() == {"online": False}
        assert (await h.http.post("/_sandbox/agent/online", json={})).status_code == 400

        closed = await h.http.post("/_sandbox/agent/close", json={"visitorId": "hf_ctl"})
        assert closed.json() == {"visitorId": "hf_ctl", "closed": True}
        again = await h.http.post("/_sandbox/agent/close", json={"visitorId": "hf_ctl"})
        assert again.status_code == 404
        await h.sandbox.wait_idle()

        assert [b["eventName"] for b in h.receiver.bodies] == [
            "conversationStarted",
            "conversationFragment",
            "conversationFragment",
            "conversationTranscript",
        ]
        assert h.receiver.bodies[2]["isNoAvailableAgent"] is False
        assert h.sandbox.rest_calls == [("POST", SEND_PATH, 200)]  # control calls not counted


# --- webhook delivery -------------------------------------------------------------------


async def test_delivery_retries_5xx_and_keeps_order(
    servers: Servers, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = Receiver(statuses=[503, 500])
    async with running(servers, receiver=receiver) as h:
        posted = await h.post("hf_retry", "x", agentId=AGENT_ID)
        await h.sandbox.wait_idle()
    assert [b["eventName"] for b in receiver.bodies] == [
        "conversationStarted",
        "conversationStarted",
        "conversationStarted",
        "conversationFragment",
    ]
    assert [m["id"] for m in messages(receiver.bodies[3]["messages"])] == [posted["id"]]
    assert "webhook delivery failed" not in caplog.text


async def test_failed_delivery_is_logged_without_the_url(
    servers: Servers,
    caplog: pytest.LogCaptureFixture,
) -> None:
    receiver = Receiver(statuses=[404, 410])
    async with running(servers, receiver=receiver) as h:
        await h.post("hf_gone", "x", agentId=AGENT_ID)
        await h.sandbox.wait_idle()
    assert len(receiver.bodies) == 2  # a 4xx is not retried
    failures = [r.getMessage() for r in caplog.records if r.name == "service.brevo.sandbox"]
    assert len(failures) == 2
    assert failures[0].startswith("webhook delivery failed: HTTP 404")
    assert failures[1].startswith("webhook delivery failed: HTTP 410")
    assert all(
        r.levelno == logging.WARNING for r in caplog.records if r.name == "service.brevo.sandbox"
    )
    assert HOOK_TOKEN not in " ".join(failures)
    assert "127.0.0.1" not in " ".join(failures)


async def test_no_webhook_url_means_no_delivery(servers: Servers) -> None:
    receiver = Receiver()
    servers.hooks.target = receiver.app
    sandbox = BrevoSandbox(api_key=API_KEY, auto_agent=False)
    try:
        await sandbox.agent_says("hf_quiet", "nobody listens")
        await sandbox.wait_idle()
        sandbox.set_webhook_url(servers.hook_url)
        await sandbox.agent_says("hf_quiet", "now somebody does")
        await sandbox.wait_idle()
    finally:
        await sandbox.aclose()
    assert [[m["text"] for m in messages(b["messages"])] for b in receiver.bodies] == [
        ["now somebody does"]
    ]
