"""Many reply streams in a process of their own, for test_soak.py.

The soak test runs the service in its own process and these streams here, so that what the
streams' client side holds is not counted in the service's memory. Usage::

    python soak_client.py <grpc target> <channels> <streams per handoff> <deadline s> <id>...

It opens ``streams per handoff`` StreamAgentReplies calls on each handoff id, spread
round-robin over ``channels`` gRPC channels, each on a TCP connection of its own. Each stream
reads until its server completes it (a one-handoff stream completes after HandoffEnded), an
error ends it, or ``deadline s`` seconds have passed. It writes JSON lines on its standard
output:

- ``{"ready": n, "failed": k, "seconds": s}`` once every stream has received its first
  event (the service subscribes a stream before it replays, so such a stream is live), or
  once every stream that did not has failed;
- then, when every stream has ended, one line per stream: ``{"stream": i, "handoff": id,
  "events": [what, ...], "cursors": n distinct, "cursor_digest": sha256 of the cursors,
  "heartbeats": n, "code": "OK" or the status code's name, "details": ...}``;
- and last ``{"done": streams, "rss_mib": this process's resident memory, "seconds": s}``.

When its standard input closes before that (the test gave up), it cancels every stream and
exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import sys
import time
from dataclasses import dataclass, field

import grpc
from client_process import emit, rss_mib

from service.rpc.generated.handoff.v1 import handoff_pb2 as pb
from service.rpc.generated.handoff.v1 import handoff_pb2_grpc as pb_grpc


def describe(event: pb.HandoffEvent) -> str:
    """An event as a short text that the test compares exactly."""
    kind = event.WhichOneof("payload")
    if kind == "agent_message":
        return f"{event.agent_message.brevo_message_id} {event.agent_message.text}"
    if kind == "agent_joined":
        return f"joined {event.agent_joined.agent.id}"
    if kind == "handoff_ended":
        return f"ended {pb.EndReason.Name(event.handoff_ended.reason)}"
    return str(kind)


@dataclass
class Stream:
    number: int
    handoff_id: str
    events: list[str] = field(default_factory=list)
    cursors: list[str] = field(default_factory=list)
    heartbeats: int = 0
    code: str = ""
    details: str = ""

    async def run(
        self, stub: pb_grpc.HandoffServiceAsyncStub, first: asyncio.Event, deadline_s: float
    ) -> None:
        call = stub.StreamAgentReplies(pb.StreamAgentRepliesRequest(handoff_id=self.handoff_id))
        try:
            async with asyncio.timeout(deadline_s):
                async for item in call:
                    if item.WhichOneof("item") == "heartbeat":
                        self.heartbeats += 1
                        continue
                    self.events.append(describe(item.event))
                    self.cursors.append(item.event.cursor)
                    first.set()
            self.code = "OK"
        except grpc.aio.AioRpcError as exc:
            self.code, self.details = exc.code().name, exc.details() or ""
        except TimeoutError:
            self.code, self.details = "CLIENT_DEADLINE", f"still open after {deadline_s} s"
        finally:
            call.cancel()  # a no-op once the call has ended; ends it otherwise
            first.set()  # a stream that ended without an event must not hold "ready" back

    def report(self) -> dict[str, object]:
        digest = hashlib.sha256("\n".join(self.cursors).encode()).hexdigest()
        return {
            "stream": self.number,
            "handoff": self.handoff_id,
            "events": self.events,
            "cursors": len(set(self.cursors)),
            "cursor_digest": digest,
            "heartbeats": self.heartbeats,
            "code": self.code,
            "details": self.details,
        }


async def stdin_closed() -> None:
    """Returns when the standard input reaches its end (the test closed it)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    try:
        while await reader.read(4096):
            pass
    finally:
        transport.close()


async def run_streams(
    target: str, channels: int, per_handoff: int, deadline_s: float, handoff_ids: list[str]
) -> None:
    started = time.monotonic()
    # A local subchannel pool gives each channel a TCP connection of its own; channels with
    # the same target and options would otherwise share one.
    opened = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(channels)
    ]
    try:
        stubs = [pb_grpc.HandoffServiceStub(channel) for channel in opened]
        streams = [
            Stream(h * per_handoff + s, handoff_id)
            for h, handoff_id in enumerate(handoff_ids)
            for s in range(per_handoff)
        ]
        firsts = [asyncio.Event() for _ in streams]
        tasks = [
            asyncio.create_task(stream.run(stubs[stream.number % channels], first, deadline_s))
            for stream, first in zip(streams, firsts, strict=True)
        ]
        try:
            async with asyncio.timeout(deadline_s):
                await asyncio.gather(*(first.wait() for first in firsts))
            emit(
                {
                    "ready": sum(1 for s in streams if s.events),
                    "failed": sum(1 for s in streams if s.code and not s.events),
                    "seconds": round(time.monotonic() - started, 2),
                }
            )
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            emit(stream.report())
        emit(
            {
                "done": len(streams),
                "rss_mib": round(rss_mib(), 1),
                "seconds": round(time.monotonic() - started, 2),
            }
        )
    finally:
        for channel in opened:
            await channel.close()


async def main(argv: list[str]) -> None:
    target, channels, per_handoff, deadline_s = argv[0], int(argv[1]), int(argv[2]), argv[3]
    work = asyncio.create_task(
        run_streams(target, channels, per_handoff, float(deadline_s), argv[4:])
    )
    watch = asyncio.create_task(stdin_closed())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, watch):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watch
        if work.done() and not work.cancelled():
            work.result()  # a failure of the client itself shows on its standard error
        else:
            with contextlib.suppress(asyncio.CancelledError):
                await work


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
