"""The benchmark's stream clients: many ``StreamAgentReplies`` streams in one process of
their own, so that neither their CPU nor their memory counts as the server's.

``python -m bench.streams <grpc target>``, then one JSON command per line on standard input,
each answered by one JSON line on standard output:

- ``{"cmd": "open", "handoffs": [...], "per_handoff": n, "channels": c}``: opens the streams
  and answers once every stream has received its first item (the caller makes the server
  send one) or ended, with how many are open (``opened``) and the first errors;
- ``{"cmd": "reset"}``: forgets what was received so far; ``{"cmd": "count"}``: how many
  agent messages arrived since;
- ``{"cmd": "report"}``: how many agent messages arrived and the latency of each: a message's
  text starts ``bench:<time.monotonic_ns() when it was posted>``; CLOCK_MONOTONIC is one
  clock for every process of the machine;
- ``{"cmd": "close"}``: cancels every stream and exits.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field

import grpc

from service.rpc.generated.handoff.v1 import handoff_pb2 as pb
from service.rpc.generated.handoff.v1 import handoff_pb2_grpc as pb_grpc

MARK = "bench:"


@dataclass
class Received:
    latencies_ns: list[int] = field(default_factory=list)
    arrivals_ns: list[int] = field(default_factory=list)
    other_items: int = 0
    resumes: int = 0  # streams cut off for falling behind, resumed from their cursor


class Streams:
    def __init__(self, target: str) -> None:
        self._target = target
        self._channels: list[grpc.aio.Channel] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._first: list[asyncio.Event] = []
        self.received = Received()
        self.errors: list[str] = []

    async def open(self, handoffs: list[str], per_handoff: int, channels: int) -> int:
        # A local subchannel pool each: one TCP connection per channel, as separate clients.
        self._channels = [
            grpc.aio.insecure_channel(self._target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(channels)
        ]
        stubs = [pb_grpc.HandoffServiceStub(c) for c in self._channels]
        n = 0
        for handoff_id in handoffs:
            for _ in range(per_handoff):
                first = asyncio.Event()
                self._first.append(first)
                stub = stubs[n % len(stubs)]
                self._tasks.append(asyncio.create_task(self._read(stub, handoff_id, first)))
                n += 1
        await asyncio.gather(*(f.wait() for f in self._first))
        # A stream that failed to open has ended by now (its first-item event is set on the
        # way out): what is still running is open.
        return sum(not task.done() for task in self._tasks)

    async def _read(
        self, stub: pb_grpc.HandoffServiceAsyncStub, handoff_id: str, first: asyncio.Event
    ) -> None:
        """Reads the stream; resumes from its last cursor when the server cut it off for
        falling behind (RESOURCE_EXHAUSTED), as a bot backend does."""
        cursor = ""
        try:
            while True:
                call = stub.StreamAgentReplies(
                    pb.StreamAgentRepliesRequest(handoff_id=handoff_id, after_cursor=cursor)
                )
                try:
                    async for item in call:
                        first.set()
                        if item.WhichOneof("item") != "event":
                            self.received.other_items += 1
                            continue
                        cursor = item.event.cursor
                        text = item.event.agent_message.text
                        if text.startswith(MARK):
                            now = time.monotonic_ns()
                            received = self.received  # not kept across items: reset replaces it
                            sent = int(text[len(MARK) :].split(" ", 1)[0])
                            received.latencies_ns.append(now - sent)
                            received.arrivals_ns.append(now)
                        else:
                            self.received.other_items += 1
                    return
                except grpc.aio.AioRpcError as exc:
                    if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and cursor:
                        self.received.resumes += 1
                        continue
                    self.errors.append(f"{exc.code().name}: {exc.details()}")
                    return
        finally:
            first.set()

    def reset(self) -> None:
        self.received = Received()

    def report(self) -> dict[str, object]:
        r = self.received
        return {
            "messages": len(r.latencies_ns),
            "latencies_ns": r.latencies_ns,
            "arrivals_ns": r.arrivals_ns,
            "other_items": r.other_items,
            "resumes": r.resumes,
            "errors": self.errors[:10],
            "error_count": len(self.errors),
        }

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for channel in self._channels:
            await channel.close()


async def main(target: str) -> None:
    streams = Streams(target)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def answer(value: dict[str, object]) -> None:
        sys.stdout.write(json.dumps(value) + "\n")
        sys.stdout.flush()

    while line := await reader.readline():
        command = json.loads(line)
        match command["cmd"]:
            case "open":
                opened = await streams.open(
                    command["handoffs"], command["per_handoff"], command["channels"]
                )
                answer({"opened": opened, "errors": streams.errors[:10]})
            case "count":
                answer({"messages": len(streams.received.latencies_ns)})
            case "reset":
                streams.reset()
                answer({"reset": True})
            case "report":
                answer(streams.report())
            case "close":
                await streams.close()
                answer({"closed": True})
                return
    await streams.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
