"""A gRPC client that opens a reply stream, reads one item and then stops reading until it
is told to read again (a line on its standard input).

test_slow_consumer.py runs it as a process of its own, so that what its connection holds
(gRPC's flow-control windows let it absorb a few MiB) is not counted in the memory of the
process that runs the service. Usage: ``python silent_client.py <grpc target> <handoff id>``.
It writes JSON lines on its standard output: ``{"first": [cursor, what]}`` once the first
item has arrived; after the line on standard input, ``{"held": [[cursor, what], ...],
"code": ..., "details": ..., "rss_mib": ...}`` with everything it read then and how the
stream ended.
"""

from __future__ import annotations

import asyncio
import sys

import grpc
from client_process import emit, rss_mib

from service.rpc.generated.handoff.v1 import handoff_pb2 as pb
from service.rpc.generated.handoff.v1 import handoff_pb2_grpc as pb_grpc


def describe(event: pb.HandoffEvent) -> str:
    kind = event.WhichOneof("payload")
    if kind == "agent_message":
        return event.agent_message.brevo_message_id
    return str(kind)


async def main(target: str, handoff_id: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        call = pb_grpc.HandoffServiceStub(channel).StreamAgentReplies(
            pb.StreamAgentRepliesRequest(handoff_id=handoff_id)
        )
        async with asyncio.timeout(20):
            first = await call.read()
        assert isinstance(first, pb.StreamAgentRepliesResponse)
        emit({"first": [first.event.cursor, describe(first.event)]})
        # Not a byte read from the stream until the test says so.
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        held: list[list[str]] = []
        code, details = "OK", ""
        try:
            async with asyncio.timeout(60):
                while True:
                    item = await call.read()
                    if item is grpc.aio.EOF:
                        break
                    assert isinstance(item, pb.StreamAgentRepliesResponse)
                    if item.WhichOneof("item") == "event":
                        held.append([item.event.cursor, describe(item.event)])
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code().name, exc.details() or ""
        emit({"held": held, "code": code, "details": details, "rss_mib": round(rss_mib(), 1)})


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
