"""Test support: the real service on loopback ports, a gRPC client, webhook posting."""

from __future__ import annotations

import asyncio
import copy
import inspect
import json
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
from log_audit import AUDIT
from starlette.types import ASGIApp, Receive, Scope, Send

from bench.processes import free_port as free_port  # tests pick ports as the bench does
from service.app import RunningService, start_service
from service.brevo.client import RetryPolicy
from service.brevo.sandbox import BrevoSandbox
from service.config import Config, load_config
from service.core.models import Handoff, HandoffState
from service.rpc.generated.handoff.v1 import handoff_pb2 as pb
from service.rpc.generated.handoff.v1 import handoff_pb2_grpc as pb_grpc

FIXTURES = Path(__file__).parent / "fixtures" / "brevo"
SERVICE_AGENT_ID = "Bridg3AgentId0001"  # the service's agent id in the fixtures
FIXTURE_VISITOR_ID = "hf_7c1d2e3f4a5b6c7d8e9f0a1b"
FAST_RETRY = RetryPolicy(max_attempts=4, base_delay_s=0.01, max_delay_s=0.05)


def fixture(name: str, visitor_id: str | None = None) -> dict[str, object]:
    """A fixture body, with its visitor id replaced by a real handoff's when given."""
    body = json.loads((FIXTURES / name).read_text())
    assert isinstance(body, dict)
    if visitor_id is not None:
        body = copy.deepcopy(body)
        visitor = body.get("visitor")
        assert isinstance(visitor, dict)
        visitor["id"] = visitor_id
    return body


def sample_handoff(n: int, conversation: str | None = None) -> Handoff:
    """A pending handoff for store tests: ids ho_<n>, hf_<n>, conv-<n>."""
    return Handoff(
        id=f"ho_{n}",
        conversation_id=conversation or f"conv-{n}",
        visitor_id=f"hf_{n}",
        state=HandoffState.PENDING_AGENT,
        created_at_ms=1000 + n,
        updated_at_ms=1000 + n,
        metadata={"k": "v"},
        opening_parts=("hello",),
    )


MARTA = "HmN3bV7cX2zL9kJ4q"  # the agent of fragment_minimal.json


def agent_fragment(
    visitor_id: str, message_id: str, text: str, n: int = 0, conversation_id: str = ""
) -> dict[str, object]:
    """A conversationFragment with one message from agent Marta; ``n`` orders createdAt.

    Give the Brevo ``conversation_id`` of the visitor's chat when the sandbox also sends
    webhooks for it: fragments naming another chat would move the handoff back and forth.
    """
    body = fixture("fragment_minimal.json", visitor_id)
    if conversation_id:
        body["conversationId"] = conversation_id
    messages = body["messages"]
    assert isinstance(messages, list)
    message = dict(messages[0])
    message.update(id=message_id, text=text, createdAt=int(message["createdAt"]) + n)
    body["messages"] = [message]
    return body


def make_config(folder: Path, *flags: str, sqlite_name: str = "handoff.db") -> Config:
    config = load_config(
        [
            "--host",
            "127.0.0.1",
            "--grpc-port",
            "0",
            "--http-port",
            "0",
            "--sandbox-port",
            "0",
            "--sqlite-path",
            str(folder / sqlite_name),
            "--brevo-agent-id",
            SERVICE_AGENT_ID,
            "--sandbox-agent",
            "off",
            "--sandbox-agent-delay-seconds",
            "0.05",
            "--heartbeat-seconds",
            "5",
            "--grpc-server",
            os.environ.get("GRPC_SERVER", "grpcio"),
            *flags,
        ],
        environ={},
    )
    AUDIT.add_secrets(config.secrets)
    return config


def summarize(event: pb.HandoffEvent) -> tuple[object, ...]:
    """An event as a short tuple that tests can compare exactly."""
    kind = event.WhichOneof("payload")
    if kind == "agent_joined":
        agent = event.agent_joined.agent
        return ("joined", agent.id, agent.name)
    if kind == "agent_message":
        m = event.agent_message
        return ("message", m.brevo_message_id, m.agent.id, m.agent.name, m.text)
    if kind == "no_agent_available":
        return ("no_agent",)
    if kind == "handoff_ended":
        return ("ended", pb.EndReason.Name(event.handoff_ended.reason))
    raise AssertionError(f"unexpected event {event}")


@dataclass
class Harness:
    running: RunningService
    channel: grpc.aio.Channel
    stub: pb_grpc.HandoffServiceAsyncStub
    http: httpx.AsyncClient

    @property
    def sandbox(self) -> BrevoSandbox:
        assert self.running.sandbox is not None
        return self.running.sandbox

    @property
    def webhook_url(self) -> str:
        return self.running.webhook_url

    async def start_handoff(self, conversation_id: str = "conv-1", **fields: object) -> pb.Handoff:
        request = pb.StartHandoffRequest(conversation_id=conversation_id, **fields)  # type: ignore[arg-type]
        response = await self.stub.StartHandoff(request)
        return response.handoff

    async def post(self, body: object, *, token: str | None = None) -> httpx.Response:
        url = self.webhook_url
        if token is not None:
            url = url.rsplit("/", 1)[0] + "/" + token
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await self.http.post(url, content=content)

    async def collect(
        self,
        handoff_id: str,
        count: int,
        *,
        after_cursor: str = "",
        timeout_s: float = 5.0,
    ) -> list[pb.HandoffEvent]:
        """The first ``count`` events of a stream (heartbeats skipped); fails on timeout."""
        call = self.stub.StreamAgentReplies(
            pb.StreamAgentRepliesRequest(handoff_id=handoff_id, after_cursor=after_cursor)
        )
        events: list[pb.HandoffEvent] = []

        async def read() -> None:
            async for item in call:
                if item.WhichOneof("item") == "event":
                    events.append(item.event)
                    if len(events) == count:
                        return

        try:
            await asyncio.wait_for(read(), timeout_s)
        except TimeoutError:
            raise AssertionError(
                f"got {len(events)} of {count} events: {[summarize(e) for e in events]}"
            ) from None
        finally:
            call.cancel()
        return events

    async def settle(self) -> None:
        """Waits until the sandbox has delivered every webhook it scheduled."""
        await self.sandbox.wait_idle()


async def open_harness(config: Config) -> Harness:
    running = await start_service(config, retry=FAST_RETRY)
    channel = grpc.aio.insecure_channel(running.grpc_target)
    return Harness(
        running=running,
        channel=channel,
        stub=pb_grpc.HandoffServiceStub(channel),
        http=httpx.AsyncClient(timeout=10),
    )


async def close_harness(h: Harness) -> None:
    await h.http.aclose()
    await h.channel.close()
    await h.running.stop(0.5)


class Dispatch:
    """An ASGI app that forwards to the current test's app (the servers outlive tests)."""

    def __init__(self) -> None:
        self.target: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert self.target is not None, "no app installed for this test"
        await self.target(scope, receive, send)


def all_summaries(events: Sequence[pb.HandoffEvent]) -> list[tuple[object, ...]]:
    return [summarize(e) for e in events]


async def until(
    condition: Callable[[], bool | Awaitable[bool]], timeout_s: float = 5.0, what: str = ""
) -> None:
    """Waits until ``condition()`` holds (it may be a coroutine function): for state that
    another task or process changes and that has no event to wait on."""

    async def holds() -> bool:
        result = condition()
        return await result if inspect.isawaitable(result) else result

    try:
        async with asyncio.timeout(timeout_s):
            while not await holds():  # noqa: ASYNC110 (nothing to wait on but the state)
                await asyncio.sleep(0.005)
    except TimeoutError:
        raise AssertionError(f"still not true after {timeout_s} s: {what}") from None
