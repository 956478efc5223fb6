"""Two service processes sharing one real Redis, as two replicas behind a Kubernetes Service.

Brevo (the sandbox, in this test process) sends its webhooks to replica A; the bot's
streams are held wherever the test says. Redis requires a password, and no log line of
either replica may show it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis_server import RedisServer
from service_process import ServiceProcess, finish, start_service_process
from support import MARTA, SERVICE_AGENT_ID, agent_fragment, all_summaries, fixture, until

from service.brevo.sandbox import BrevoSandbox, Fault
from service.http_server import RunningHttpServer, start_http_server
from service.rpc.generated.handoff.v1 import handoff_pb2 as pb
from service.rpc.generated.handoff.v1 import handoff_pb2_grpc as pb_grpc

API_KEY = "xkeysib-replicas-0123456789-SecretKey"
TOKEN = "tok_ReplicaWebhookSecret_0042"
REDIS_PASSWORD = "redis-Pa55word-NeverLogged"
SAM = ("SandboxAgentSam01", "Sam")


Replica = ServiceProcess


async def start_replica(name: str, env: dict[str, str]) -> Replica:
    return await start_service_process(f"replica {name}", env, TOKEN)


async def stop_replica(replica: Replica) -> int:
    """SIGTERM, as Kubernetes stops a pod; returns the exit code."""
    return await finish(replica)


@dataclass
class Cluster:
    a: Replica
    b: Replica
    sandbox: BrevoSandbox
    http: httpx.AsyncClient
    redis: RedisServer

    def scripts_run(self, reset: bool = False) -> int:
        """How many Lua scripts Redis has run (EVALSHA) since its statistics were reset; not
        counted: those refused for a script not loaded yet (a replica then loads it)."""
        client = redis.Redis(port=self.redis.port, password=REDIS_PASSWORD, socket_timeout=5)
        try:
            stats = client.info("commandstats").get("cmdstat_evalsha", {})
            calls = int(stats.get("calls", 0)) - int(stats.get("failed_calls", 0))
            if reset:
                client.config_resetstat()
            return calls
        finally:
            client.close()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    server = RedisServer(tmp_path / "redis", password=REDIS_PASSWORD)
    server.start()
    sandbox = BrevoSandbox(api_key=API_KEY, auto_agent=False)
    brevo: RunningHttpServer = await start_http_server(sandbox.app, "127.0.0.1", 0)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BREVO_", "HANDOFF_"))}
    env.update(
        BREVO_API_KEY=API_KEY,
        BREVO_BASE_URL=f"{brevo.base_url}/v3",
        BREVO_AGENT_ID=SERVICE_AGENT_ID,
        WEBHOOK_TOKEN=TOKEN,
        REDIS_URL=server.url,
        HANDOFF_HOST="127.0.0.1",
        HANDOFF_HEARTBEAT_SECONDS="0.5",
        HANDOFF_LOG_LEVEL="DEBUG",
        PYTHONUNBUFFERED="1",
    )
    replicas: list[Replica] = []
    http = httpx.AsyncClient(timeout=10)
    try:
        replicas += await asyncio.gather(start_replica("A", env), start_replica("B", env))
        sandbox.set_webhook_url(replicas[0].webhook_url)
        yield Cluster(replicas[0], replicas[1], sandbox, http, server)
    finally:
        for replica in replicas:
            await stop_replica(replica)
        await http.aclose()
        await sandbox.aclose()
        await brevo.stop(1)
        server.stop()
    for replica in replicas:
        for secret in (API_KEY, TOKEN, REDIS_PASSWORD):
            assert secret not in replica.log, f"{replica.name} logged a secret"


async def read_until_ended(call: object, into: list[pb.HandoffEvent]) -> None:
    async for item in call:  # type: ignore[attr-defined]
        if item.WhichOneof("item") == "event":
            into.append(item.event)


async def stream_first_replies(
    replica: Replica, sandbox: BrevoSandbox, handoff: pb.Handoff
) -> tuple[Any, list[pb.HandoffEvent]]:
    """Opens a stream on ``replica``; the agent joins and says three things, which arrive.
    Returns the open call and those four events."""
    call = replica.stub.StreamAgentReplies(pb.StreamAgentRepliesRequest(handoff_id=handoff.id))
    first = [await sandbox.agent_says(handoff.visitor_id, f"before {i}") for i in range(3)]
    received: list[pb.HandoffEvent] = []
    while len(received) < 4:
        item = await asyncio.wait_for(call.read(), 10)
        assert isinstance(item, pb.StreamAgentRepliesResponse)
        if item.WhichOneof("item") == "event":
            received.append(item.event)
    assert all_summaries(received) == [
        ("joined", *SAM),
        *[("message", m["id"], *SAM, f"before {i}") for i, m in enumerate(first)],
    ]
    return call, received


async def agent_ends_and_client_resumes_on(
    replica: Replica, sandbox: BrevoSandbox, handoff: pb.Handoff, cursor: str
) -> None:
    """The agent says three more things and closes the chat; a client resuming from
    ``cursor`` on ``replica`` gets exactly those, then the end."""
    later = [await sandbox.agent_says(handoff.visitor_id, f"after {i}") for i in range(3)]
    await sandbox.close_conversation(handoff.visitor_id)
    await sandbox.wait_idle()
    resumed: list[pb.HandoffEvent] = []
    again = replica.stub.StreamAgentReplies(
        pb.StreamAgentRepliesRequest(handoff_id=handoff.id, after_cursor=cursor)
    )
    await asyncio.wait_for(read_until_ended(again, resumed), 10)
    assert all_summaries(resumed) == [
        *[("message", m["id"], *SAM, f"after {i}") for i, m in enumerate(later)],
        ("ended", "END_REASON_AGENT_CLOSED"),
    ]


async def start_with_chat(cluster: Cluster, conversation_id: str) -> tuple[pb.Handoff, str]:
    """A handoff started on replica A, and the Brevo chat its opening message went to (the
    fragments a test posts name it, as Brevo's do)."""
    handoff = (
        await cluster.a.stub.StartHandoff(pb.StartHandoffRequest(conversation_id=conversation_id))
    ).handoff
    await cluster.sandbox.wait_idle()  # the echo of the opening message names Brevo's chat
    got = await cluster.a.stub.GetHandoff(pb.GetHandoffRequest(handoff_id=handoff.id))
    assert got.handoff.brevo_conversation_id
    return handoff, got.handoff.brevo_conversation_id


async def read_until_cut(call: Any) -> None:
    """Reads heartbeats until the stream ends with an error (which it raises)."""
    while True:
        await asyncio.wait_for(call.read(), 10)


async def read_until_idle(
    stub: pb_grpc.HandoffServiceAsyncStub, handoff_id: str, after_cursor: str = ""
) -> list[pb.HandoffEvent]:
    """Every event of the stream up to the first heartbeat: all there is, for now."""
    events: list[pb.HandoffEvent] = []
    call = stub.StreamAgentReplies(
        pb.StreamAgentRepliesRequest(handoff_id=handoff_id, after_cursor=after_cursor)
    )
    try:
        async with asyncio.timeout(10):
            async for item in call:
                if item.WhichOneof("item") == "heartbeat":
                    return events
                events.append(item.event)
    finally:
        call.cancel()
    raise AssertionError("the stream ended without a heartbeat")


async def test_webhooks_on_a_reach_a_stream_on_b_once_and_in_order(cluster: Cluster) -> None:
    a, b, sandbox = cluster.a, cluster.b, cluster.sandbox
    started = await a.stub.StartHandoff(pb.StartHandoffRequest(conversation_id="conv-ab"))
    handoff = started.handoff
    call = b.stub.StreamAgentReplies(pb.StreamAgentRepliesRequest(handoff_id=handoff.id))
    received: list[pb.HandoffEvent] = []
    reading = asyncio.create_task(read_until_ended(call, received))
    said = [await sandbox.agent_says(handoff.visitor_id, f"reply {i}") for i in range(10)]
    await sandbox.close_conversation(handoff.visitor_id)
    await asyncio.wait_for(reading, 10)  # the stream completes after HandoffEnded
    assert all_summaries(received) == [
        ("joined", *SAM),
        *[("message", m["id"], *SAM, f"reply {i}") for i, m in enumerate(said)],
        ("ended", "END_REASON_AGENT_CLOSED"),
    ]
    # The webhooks really went to A only, and B really served the stream.
    assert "webhook stored" in a.log
    assert "webhook stored" not in b.log
    # Both replicas stop cleanly on SIGTERM.
    assert await stop_replica(a) == 0
    assert await stop_replica(b) == 0


async def test_a_client_of_a_killed_replica_resumes_on_the_other_with_exactly_what_it_missed(
    cluster: Cluster,
) -> None:
    a, b, sandbox = cluster.a, cluster.b, cluster.sandbox
    handoff = (
        await a.stub.StartHandoff(pb.StartHandoffRequest(conversation_id="conv-kill"))
    ).handoff
    call, received = await stream_first_replies(b, sandbox, handoff)

    b.process.kill()  # SIGKILL: no goodbye to anyone; the client's channel stays open
    assert await b.process.wait() == -signal.SIGKILL

    with pytest.raises(grpc.aio.AioRpcError) as cut:
        await read_until_cut(call)
    assert cut.value.code() == grpc.StatusCode.UNAVAILABLE

    await agent_ends_and_client_resumes_on(a, sandbox, handoff, received[-1].cursor)


async def test_the_same_fragment_posted_to_both_replicas_at_once_counts_once(
    cluster: Cluster,
) -> None:
    a, b, http = cluster.a, cluster.b, cluster.http
    handoff, chat = await start_with_chat(cluster, "conv-dup")
    for i in range(20):
        body = agent_fragment(handoff.visitor_id, f"dup-{i}", f"text {i}", i, chat)
        answers = await asyncio.gather(
            http.post(a.webhook_url, json=body), http.post(b.webhook_url, json=body)
        )
        assert sorted(r.json()["outcome"] for r in answers) == ["duplicate", "stored"], [
            r.json() for r in answers
        ]
    for replica in (a, b):
        events = await read_until_idle(replica.stub, handoff.id)
        assert all_summaries(events) == [
            ("joined", MARTA, ""),
            *[("message", f"dup-{i}", MARTA, "", f"text {i}") for i in range(20)],
        ]


async def test_a_webhook_costs_one_script_unless_its_replica_must_plan_it_again(
    cluster: Cluster,
) -> None:
    """Each replica plans a webhook on its own last copy of the handoff first. That copy is
    behind whenever the other replica committed since: Redis refuses the plan and answers
    with what it holds, in the same script, and the plan is made again on that. Each
    fragment here goes to one replica, then again to the other (as Brevo retries): every
    message is stored once and every retry is a duplicate, each for one script (a stored one
    finds its replica's copy current, as that replica read the handoff last; a retry finds
    the other's behind, and the refusal itself shows its message known). A new message on a
    replica whose copy is behind costs two: the refusal, then the commit."""
    a, b, http = cluster.a, cluster.b, cluster.http
    handoff, chat = await start_with_chat(cluster, "conv-turns")

    async def post(replica: Replica, n: int) -> tuple[int, object, int]:
        """Posts message ``n``: the status, the answer and the scripts it cost."""
        cluster.scripts_run(reset=True)
        body = agent_fragment(handoff.visitor_id, f"turn-{n}", f"text {n}", n, chat)
        answer = await http.post(replica.webhook_url, json=body)
        return answer.status_code, answer.json(), cluster.scripts_run()

    answers = []
    for i in range(10):
        first, then = (a, b) if i % 2 == 0 else (b, a)
        answers.append((await post(first, i), await post(then, i)))
    assert answers == [
        (
            (200, {"outcome": "stored", "events": 2 if i == 0 else 1}, 1),  # 0: the agent joins
            (200, {"outcome": "duplicate", "events": 0}, 1),
        )
        for i in range(10)
    ]
    # A's copy is current (its refused retry of message 9 read it), B's now falls behind.
    assert await post(a, 10) == (200, {"outcome": "stored", "events": 1}, 1)
    assert await post(b, 11) == (200, {"outcome": "stored", "events": 1}, 2)
    for replica in (a, b):
        events = await read_until_idle(replica.stub, handoff.id)
        assert all_summaries(events) == [
            ("joined", MARTA, ""),
            *[("message", f"turn-{i}", MARTA, "", f"text {i}") for i in range(12)],
        ]


async def test_a_webhook_that_changes_nothing_on_a_replicas_copy_is_checked_against_redis(
    cluster: Cluster,
) -> None:
    """A plan made on a replica's own copy that changes nothing is not taken for a
    duplicate: the copy may be behind. Here A last saw "no agent available" set, B then saw
    agents come back, and the next "no agent available" on A is a change, and an event."""
    a, b, http = cluster.a, cluster.b, cluster.http
    handoff, chat = await start_with_chat(cluster, "conv-no-agent")
    gone = {
        **fixture("fragment_no_agent.json", handoff.visitor_id),
        "conversationId": chat,
        "messages": [],
        "isNoAvailableAgent": True,
    }
    back = {**gone, "isNoAvailableAgent": False}
    answers = [
        (await http.post(replica.webhook_url, json=body)).json()
        for replica, body in ((a, gone), (b, back), (a, gone))
    ]
    assert answers == [
        {"outcome": "stored", "events": 1},
        {"outcome": "stored", "events": 0},
        {"outcome": "stored", "events": 1},
    ]
    events = await read_until_idle(b.stub, handoff.id)
    assert all_summaries(events) == [("no_agent",), ("no_agent",)]


async def test_start_handoff_on_both_replicas_at_once_opens_one_and_posts_once(
    cluster: Cluster,
) -> None:
    a, b, sandbox = cluster.a, cluster.b, cluster.sandbox
    for i in range(10):
        request = pb.StartHandoffRequest(
            conversation_id=f"conv-race-{i}", title="Refund", description="wants a refund"
        )
        first, second = await asyncio.gather(
            a.stub.StartHandoff(request), b.stub.StartHandoff(request)
        )
        assert first.handoff.id == second.handoff.id
        assert sorted([first.created, second.created]) == [False, True]
        assert first.handoff.visitor_id == second.handoff.visitor_id
        posted = sandbox.messages(first.handoff.visitor_id)
        assert len(posted) == 1, posted
        assert "Refund" in str(posted[0]["text"])


async def test_sigterm_drains_a_replica_and_its_stream_resumes_on_the_other_with_nothing_lost(
    cluster: Cluster,
) -> None:
    """What Kubernetes does to a pod: SIGTERM. Health and readiness turn at once, the open
    stream ends UNAVAILABLE, a send waiting on Brevo still finishes, the process exits well
    within its grace, and the client resumes on the other replica with its cursor."""
    a, b, sandbox, http = cluster.a, cluster.b, cluster.sandbox, cluster.http
    handoff = (
        await a.stub.StartHandoff(pb.StartHandoffRequest(conversation_id="conv-drain"))
    ).handoff
    await sandbox.wait_idle()
    assert b.channel is not None
    health: Any = health_pb2_grpc.HealthStub(b.channel)  # typeshed knows only sync stubs
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
    assert (
        await asyncio.wait_for(watch.read(), 10)
    ).status == health_pb2.HealthCheckResponse.SERVING
    assert (await http.get(f"{b.base_url}/readyz")).status_code == 200

    call, received = await stream_first_replies(b, sandbox, handoff)

    # A send in flight on B: Brevo answers its first attempt after 1.5 s, with a 500.
    sandbox.inject_faults(Fault(status=500, delay_s=1.5))

    async def send() -> pb.SendMessageResponse:
        request = pb.SendMessageRequest(
            handoff_id=handoff.id, client_message_id="m-1", text="still?"
        )
        return await b.stub.SendMessage(request)

    sending = asyncio.create_task(send())
    await until(lambda: bool(sandbox.calls_in_progress), 10, "SendMessage's post to Brevo")
    signalled = time.monotonic()
    b.process.send_signal(signal.SIGTERM)

    changed = await asyncio.wait_for(watch.read(), 5)
    assert changed.status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as cut:
        await read_until_cut(call)
    assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in (cut.value.details() or "")
    assert "after_cursor" in (cut.value.details() or "")

    sent = await asyncio.wait_for(sending, 10)  # finished on B although B is stopping
    assert sent.brevo_message_id
    assert not sent.duplicate
    assert await asyncio.wait_for(b.process.wait(), 15) == 0
    assert time.monotonic() - signalled < 10  # HANDOFF_SHUTDOWN_GRACE_SECONDS (default 10)
    assert [m["text"] for m in sandbox.messages(handoff.visitor_id)][-1] == "Botpress User: still?"
    assert "shutting down" in b.log

    await agent_ends_and_client_resumes_on(a, sandbox, handoff, received[-1].cursor)
