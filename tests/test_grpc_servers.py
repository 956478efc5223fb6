"""What each of the two gRPC servers (GRPC_SERVER=grpcio and grpclib) must do at the
connection level, where grpclib needed the service's own code: many streams on one
connection, a bound on a request's size and a limit on a client's pings, alike; and the one
difference, compressed requests. The rest of the contract runs on both through `make test`'s
second pass (unit-grpclib)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from support import Harness, close_harness, make_config, open_harness

from service.rpc.generated.handoff.v1 import handoff_pb2 as pb
from service.rpc.generated.handoff.v1 import handoff_pb2_grpc as pb_grpc
from service.rpc.server import MAX_REQUEST_BYTES


@pytest.fixture(params=["grpcio", "grpclib"])
async def server_harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    h = await open_harness(make_config(tmp_path, "--grpc-server", request.param))
    try:
        yield h
    finally:
        await close_harness(h)


async def test_one_connection_carries_more_streams_than_h2s_default_of_100(
    server_harness: Harness,
) -> None:
    h = server_harness
    handoff = await h.start_handoff("conv-many-streams")
    calls = [
        h.stub.StreamAgentReplies(pb.StreamAgentRepliesRequest(handoff_id=handoff.id))
        for _ in range(150)
    ]
    try:
        # The service sends its headers as soon as a stream's request is accepted.
        opened = await asyncio.wait_for(
            asyncio.gather(*(call.initial_metadata() for call in calls)), 20
        )
        assert len(opened) == 150
    finally:
        for call in calls:
            call.cancel()


async def test_a_request_over_4_mib_is_refused_with_resource_exhausted(
    server_harness: Harness,
) -> None:
    h = server_harness
    handoff = await h.start_handoff("conv-big-request")
    await h.settle()
    before = h.sandbox.messages(handoff.visitor_id)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await h.stub.SendMessage(
            pb.SendMessageRequest(
                handoff_id=handoff.id, client_message_id="big", text="x" * MAX_REQUEST_BYTES
            )
        )
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(MAX_REQUEST_BYTES) in (refused.value.details() or "")
    # Nothing was relayed, and the connection still serves.
    assert h.sandbox.messages(handoff.visitor_id) == before
    again = await h.stub.GetHandoff(pb.GetHandoffRequest(handoff_id=handoff.id))
    assert again.handoff.id == handoff.id


class RawClient:
    """An HTTP/2 client on a bare socket, to send what gRPC's clients never send."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.h2.initiate_connection()
        self.flush()

    def flush(self) -> bool:
        """Sends what h2 has queued; False once the server has closed the connection."""
        try:
            self.sock.sendall(self.h2.data_to_send())
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def events_until_closed(self, timeout_s: float) -> list[h2.events.Event]:
        self.sock.settimeout(timeout_s)
        seen: list[h2.events.Event] = []
        while True:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                return seen
            if not data:
                return seen
            seen += self.h2.receive_data(data)
            self.flush()

    def close(self) -> None:
        self.sock.close()


async def test_a_client_pinging_too_often_is_sent_goaway_too_many_pings(
    server_harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    client = RawClient(server_harness.running.grpc_port)
    try:
        for n in range(10):
            client.h2.ping(n.to_bytes(8, "big"))
            if not client.flush():
                break
            await asyncio.sleep(0.01)
        events = await asyncio.to_thread(client.events_until_closed, 10)
    finally:
        client.close()
    goaways = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert [(g.error_code, g.additional_data) for g in goaways] == [
        (h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, b"too_many_pings")
    ]
    acks = [e for e in events if isinstance(e, h2.events.PingAckReceived)]
    assert 1 <= len(acks) < 10
    # The server closed the connection cleanly: nothing went wrong on its side.
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_compressed_request_is_served_on_grpc_aio_and_refused_on_grpclib(
    server_harness: Harness,
) -> None:
    h = server_harness
    target = h.running.grpc_target
    async with grpc.aio.insecure_channel(target, compression=grpc.Compression.Gzip) as channel:
        stub = pb_grpc.HandoffServiceStub(channel)
        # Large enough that gRPC's client compresses it (a small GetHandoff it sent as it was).
        request = pb.StartHandoffRequest(conversation_id="conv-gzip-2", description="x" * 10_000)
        if h.running.config.grpc_server == "grpcio":
            answer = await stub.StartHandoff(request)
            assert answer.created
            return
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.StartHandoff(request)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert refused.value.details() == (
        "compressed requests are not accepted: send them uncompressed"
    )
