"""Readiness and draining: what a replica tells Kubernetes, and what its clients see.

The whole SIGTERM path across two processes is in test_replicas; here, in one process,
each step on its own: readiness turning, streams ending, new streams refused, calls in
flight finishing, the Brevo key check, and the maximum connection age.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import (
    FAST_RETRY,
    SERVICE_AGENT_ID,
    Harness,
    close_harness,
    make_config,
    open_harness,
    until,
)

from service import app as service_app
from service.brevo.sandbox import BrevoSandbox, Fault
from service.http_server import start_http_server
from service.rpc.generated.handoff.v1 import handoff_pb2 as pb

API_KEY = "xkeysib-drain-test-0123456789abcdef"
TOKEN = "tok_DrainTestWebhookSecret_01"


async def test_shutdown_turns_readiness_ends_streams_and_refuses_new_ones(
    harness: Harness,
) -> None:
    handoff = await harness.start_handoff("conv-drain")
    call = harness.stub.StreamAgentReplies(pb.StreamAgentRepliesRequest(handoff_id=handoff.id))
    reading = asyncio.create_task(call.read())  # the stream is open and waiting
    await until(lambda: harness.running.manager.open_streams == 1, 5, "the stream is open")
    ready = await harness.http.get(f"{harness.running.http.base_url}/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})

    harness.running.manager.begin_shutdown()  # the first thing stop() does on SIGTERM

    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await asyncio.wait_for(reading, 5)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert ended.value.details() == (
        "this replica is shutting down; reconnect (you will reach another replica) with "
        "after_cursor set to the last cursor received"
    )
    refused = harness.stub.StreamAgentReplies(pb.StreamAgentRepliesRequest(handoff_id=handoff.id))
    with pytest.raises(grpc.aio.AioRpcError) as new_stream:
        await asyncio.wait_for(refused.read(), 5)
    assert new_stream.value.code() == grpc.StatusCode.UNAVAILABLE
    not_ready = await harness.http.get(f"{harness.running.http.base_url}/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json()["reason"].startswith("this replica is shutting down")
    # Unary calls go on until the server stops: a client that has not noticed yet loses nothing.
    sent = await harness.stub.SendMessage(
        pb.SendMessageRequest(handoff_id=handoff.id, client_message_id="late", text="hi")
    )
    assert not sent.duplicate


async def test_stop_lets_a_send_waiting_on_brevo_finish_and_ends_health_watches(
    harness: Harness,
) -> None:
    handoff = await harness.start_handoff("conv-inflight")
    await harness.settle()
    harness.sandbox.inject_faults(Fault(status=503, delay_s=0.5))  # then a retry succeeds
    watch_stub: Any = health_pb2_grpc.HealthStub(harness.channel)
    watch = watch_stub.Watch(health_pb2.HealthCheckRequest(service=""))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

    async def send() -> pb.SendMessageResponse:
        return await harness.stub.SendMessage(
            pb.SendMessageRequest(handoff_id=handoff.id, client_message_id="m", text="wait")
        )

    sending = asyncio.create_task(send())
    await until(lambda: bool(harness.sandbox.calls_in_progress), 5, "the post to Brevo")
    loop = asyncio.get_running_loop()
    started = loop.time()
    await harness.running.stop(grace_s=5)
    took = loop.time() - started

    assert (await sending).brevo_message_id
    assert harness.sandbox.messages(handoff.visitor_id)[-1]["text"] == "Botpress User: wait"
    answers: list[health_pb2.HealthCheckResponse] = []
    with pytest.raises(grpc.aio.AioRpcError):
        await read_all(watch, answers)
    assert [a.status for a in answers] == [health_pb2.HealthCheckResponse.NOT_SERVING]
    # The send took ~0.5 s; the open Watch did not hold the stop for the whole grace.
    assert took < 4, took


async def test_not_ready_until_brevo_confirms_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service_app, "BREVO_KEY_RECHECK_S", 0.2)
    sandbox = BrevoSandbox(api_key=API_KEY, auto_agent=False)
    brevo = await start_http_server(sandbox.app, "127.0.0.1", 0)
    # Brevo fails the start-up check and the next two re-checks (each with its retries).
    sandbox.inject_faults(*[Fault(status=503)] * (3 * FAST_RETRY.max_attempts))
    config = make_config(
        tmp_path,
        "--brevo-api-key",
        API_KEY,
        "--brevo-base-url",
        f"{brevo.base_url}/v3",
        "--webhook-token",
        TOKEN,
        "--brevo-agent-id",
        SERVICE_AGENT_ID,
    )
    h = await open_harness(config)
    try:
        readyz = f"{h.running.http.base_url}/readyz"
        first = await h.http.get(readyz)
        assert first.status_code == 503
        assert first.json()["reason"] == (
            "Brevo has not confirmed the API key yet (it could not be reached); checking again"
        )

        async def ready() -> bool:
            return (await h.http.get(readyz)).status_code == 200

        await until(ready, 5, "ready once Brevo answers")
        assert [c for c in sandbox.rest_calls if c[1] == "/v3/account"][-1] == (
            "GET",
            "/v3/account",
            200,
        )
    finally:
        await close_harness(h)
        await sandbox.aclose()
        await brevo.stop(1)


async def test_connections_older_than_the_maximum_age_are_rotated_and_the_stream_resumes(
    tmp_path: Path,
) -> None:
    h = await open_harness(
        make_config(
            tmp_path,
            "--grpc-max-connection-age-seconds",
            "0.5",
            "--grpc-max-connection-age-grace-seconds",
            "0.5",
            "--heartbeat-seconds",
            "0.1",
        )
    )
    try:
        handoff = await h.start_handoff("conv-age")
        await h.settle()
        said = await h.sandbox.agent_says(handoff.visitor_id, "before the rotation")
        await h.settle()
        call = h.stub.StreamAgentReplies(pb.StreamAgentRepliesRequest(handoff_id=handoff.id))
        items: list[pb.StreamAgentRepliesResponse] = []
        with pytest.raises(grpc.aio.AioRpcError) as cut:
            await asyncio.wait_for(read_all(call, items), 10)
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        events = [i.event for i in items if i.WhichOneof("item") == "event"]
        assert [e.agent_message.brevo_message_id for e in events[-1:]] == [said["id"]]
        cursor = events[-1].cursor
        later = await h.sandbox.agent_says(handoff.visitor_id, "after the rotation")
        await h.settle()
        # The same channel reconnects by itself; the stream resumes from its cursor.
        resumed = await h.collect(handoff.id, 1, after_cursor=cursor)
        assert [e.agent_message.brevo_message_id for e in resumed] == [later["id"]]
    finally:
        await close_harness(h)


async def read_all(call: Any, into: list[Any]) -> None:
    """Reads a server stream into ``into`` until it ends (an error is raised)."""
    while True:
        into.append(await call.read())


async def test_a_send_whose_caller_gives_up_still_commits_so_its_retry_posts_nothing(
    harness: Harness,
) -> None:
    """The client's deadline passes while Brevo is answering: the post still counts, and
    the retry with the same client_message_id is answered from the store."""
    handoff = await harness.start_handoff("conv-deadline")
    await harness.settle()
    posts_before = [c for c in harness.sandbox.rest_calls if c[0] == "POST"]
    harness.sandbox.inject_faults(Fault(status=200, body={"id": "slow-msg-1"}, delay_s=0.6))
    request = pb.SendMessageRequest(handoff_id=handoff.id, client_message_id="c-1", text="hi")
    with pytest.raises(grpc.aio.AioRpcError) as gave_up:
        await harness.stub.SendMessage(request, timeout=0.2)
    assert gave_up.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await until(lambda: harness.running.grpc.calls.count == 0, 5, "the abandoned send finished")
    retried = await harness.stub.SendMessage(request)
    assert (retried.brevo_message_id, retried.duplicate) == ("slow-msg-1", True)
    posts = [c for c in harness.sandbox.rest_calls if c[0] == "POST"]
    assert len(posts) == len(posts_before) + 1
