"""The whole service on Redis while Redis stops and comes back: clean errors, then service.

Nothing acknowledged is lost: the Redis here keeps an append-only file fsynced on every
write, as a production Redis holding handoffs should (see the README).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import grpc
import pytest
from redis_server import RedisServer
from support import (
    MARTA,
    Harness,
    agent_fragment,
    close_harness,
    make_config,
    open_harness,
    summarize,
    until,
)

from service.rpc.generated.handoff.v1 import handoff_pb2 as pb


@pytest.fixture
async def service(tmp_path: Path, private_redis: RedisServer) -> AsyncIterator[Harness]:
    h = await open_harness(
        make_config(tmp_path, "--redis-url", private_redis.url, "--heartbeat-seconds", "0.2")
    )
    try:
        yield h
    finally:
        await close_harness(h)


async def ready(h: Harness) -> int:
    url = h.webhook_url.split("/webhooks/")[0] + "/readyz"
    return (await h.http.get(url)).status_code


async def wait_ready(h: Harness) -> None:
    async def is_ready() -> bool:
        return await ready(h) == 200

    await until(is_ready, timeout_s=10, what="/readyz 200")


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["stopped", "crashed"])
async def test_redis_down_gives_clean_errors_and_nothing_acknowledged_is_lost(
    service: Harness, private_redis: RedisServer, how: signal.Signals
) -> None:
    h, redis = service, private_redis
    handoff = await h.start_handoff("conv-outage")
    assert h.sandbox.messages(handoff.visitor_id)  # the opening message reached Brevo
    first = await h.post(agent_fragment(handoff.visitor_id, "msg-1", "before the outage", 1))
    assert first.json() == {"outcome": "stored", "events": 2}
    before = await h.collect(handoff.id, 2)
    assert [summarize(e) for e in before][1][4] == "before the outage"
    stream = h.stub.StreamAgentReplies(
        pb.StreamAgentRepliesRequest(handoff_id=handoff.id, after_cursor=before[-1].cursor)
    )
    assert await ready(h) == 200
    # A heartbeat comes only once the replay is over: the stream is live.
    first_item = await asyncio.wait_for(stream.read(), 5)
    assert isinstance(first_item, pb.StreamAgentRepliesResponse)
    assert first_item.WhichOneof("item") == "heartbeat"

    redis.stop(how)

    # The open stream ends, telling the client what to do.
    async def read_to_the_end() -> None:
        while await asyncio.wait_for(stream.read(), 5) is not grpc.aio.EOF:
            pass

    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await read_to_the_end()
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "reconnect with after_cursor" in str(ended.value.details())
    # Every call says UNAVAILABLE, and what failed.
    calls: list[Awaitable[object]] = [
        h.stub.StartHandoff(pb.StartHandoffRequest(conversation_id="conv-new")),
        h.stub.SendMessage(
            pb.SendMessageRequest(handoff_id=handoff.id, client_message_id="c1", text="hi")
        ),
        h.stub.GetHandoff(pb.GetHandoffRequest(handoff_id=handoff.id)),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "Redis at 127.0.0.1" in str(failed.value.details())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await h.collect(handoff.id, 1, after_cursor=before[-1].cursor)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    # Brevo's webhook gets 503, so that it retries; readiness says not ready, liveness ok.
    during = agent_fragment(handoff.visitor_id, "msg-2", "during the outage", 2)
    answer = await h.post(during)
    assert answer.status_code == 503
    assert answer.json() == {"error": "temporarily unable to store the event; retry later"}
    assert await ready(h) == 503
    health = await h.http.get(h.webhook_url.split("/webhooks/")[0] + "/healthz")
    assert health.status_code == 200
    # Nothing reached Brevo twice or half-way while the store was gone.
    assert [m["text"] for m in h.sandbox.messages(handoff.visitor_id)][1:] == []

    redis.start()
    await wait_ready(h)

    # Brevo retries the webhook; the client resumes from its last cursor.
    assert (await h.post(during)).json() == {"outcome": "stored", "events": 1}
    missed = await h.collect(handoff.id, 1, after_cursor=before[-1].cursor)
    assert [summarize(e) for e in missed] == [("message", "msg-2", MARTA, "", "during the outage")]
    # What was acknowledged before the outage is all still there.
    replay = await h.collect(handoff.id, 3)
    assert [e.cursor for e in replay] == [e.cursor for e in before] + [missed[0].cursor]
    sent = await h.stub.SendMessage(
        pb.SendMessageRequest(handoff_id=handoff.id, client_message_id="c1", text="after")
    )
    assert not sent.duplicate
    assert [m["text"] for m in h.sandbox.messages(handoff.visitor_id)][-1] == (
        "Botpress User: after"
    )


async def test_a_replica_started_before_redis_is_not_ready_until_it_answers(
    tmp_path: Path,
) -> None:
    redis = RedisServer(tmp_path / "redis")
    h = await open_harness(make_config(tmp_path, "--redis-url", redis.url))
    try:
        assert await ready(h) == 503
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await h.start_handoff("conv-early")
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        redis.start()
        await wait_ready(h)
        handoff = await h.start_handoff("conv-early")
        assert handoff.state == pb.HANDOFF_STATE_PENDING_AGENT
    finally:
        await close_harness(h)
        redis.stop()
