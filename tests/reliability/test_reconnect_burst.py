"""After a rollout or a lost connection, every bot backend reconnects its streams at once.

A burst of stream openings on one replica must open every one of them: gRPC's server, left
at its defaults, cancels calls that arrive while more than 1,000 wait for the application
to take them (some of them up to 3,000 waiting, all of them beyond), and the client sees a
bare CANCELLED. Here 3,000 streams open at once, over 30 connections, and each must get its
first agent message and stay open.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
import pytest
from reliability_support import record_figures
from support import Harness, agent_fragment

from service.rpc.generated.handoff.v1 import handoff_pb2 as pb
from service.rpc.generated.handoff.v1 import handoff_pb2_grpc as pb_grpc

STREAMS = 3000
CONNECTIONS = 30
HANDOFFS = 10


async def test_a_burst_of_stream_openings_opens_every_stream(
    sqlite_harness: Harness,
    request: pytest.FixtureRequest,
    record_property: Callable[[str, object], None],
) -> None:
    h = sqlite_harness
    handoffs = [await h.start_handoff(f"burst-{n}") for n in range(HANDOFFS)]
    for n, handoff in enumerate(handoffs):
        answer = await h.post(agent_fragment(handoff.visitor_id, f"m{n}", "hello"))
        assert answer.status_code == 200
    channels = [
        grpc.aio.insecure_channel(
            h.running.grpc_target, options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(CONNECTIONS)
    ]
    loop = asyncio.get_running_loop()
    first_items: list[asyncio.Future[str]] = [loop.create_future() for _ in range(STREAMS)]
    endings: list[str] = []

    async def read(
        stub: pb_grpc.HandoffServiceAsyncStub, handoff_id: str, got: asyncio.Future[str]
    ) -> None:
        call = stub.StreamAgentReplies(pb.StreamAgentRepliesRequest(handoff_id=handoff_id))
        try:
            async for item in call:
                if not got.done() and item.event.HasField("agent_message"):
                    got.set_result(item.event.agent_message.brevo_message_id)
            endings.append("ended")
        except grpc.aio.AioRpcError as exc:
            endings.append(exc.code().name)
        finally:
            if not got.done():
                got.set_result("")

    stubs = [pb_grpc.HandoffServiceStub(c) for c in channels]
    started = time.monotonic()
    readers = [
        asyncio.create_task(read(stubs[n % CONNECTIONS], handoffs[n % HANDOFFS].id, got))
        for n, got in enumerate(first_items)
    ]
    try:
        async with asyncio.timeout(120):
            firsts = await asyncio.gather(*first_items)
        opened_s = time.monotonic() - started
        await asyncio.sleep(1.0)
        assert endings == []
        assert sorted(set(firsts)) == [f"m{n}" for n in range(HANDOFFS)]
        assert h.running.manager.open_streams == STREAMS
        record_figures(
            request,
            record_property,
            {
                "streams": STREAMS,
                "connections": CONNECTIONS,
                "ended": len(endings),
                "all_open_after_s": round(opened_s, 2),
            },
        )
    finally:
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for channel in channels:
            await channel.close()
