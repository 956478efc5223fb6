"""The benchmark's other servers, each run as a process of its own:

- ``standin``: Brevo's REST API (the project's ``BrevoSandbox``, Brevo's exact shapes) with
  no simulated agent and no webhooks: it answers every post at once.
- ``bare``: the baselines, the bare transports the service is built on, on one event loop
  as the service has them: a ``grpc.aio`` server whose ``StreamAgentReplies`` streams
  pre-built messages (the contract's own types, so the same clients read both), and, on
  the same uvicorn set-up as the gateway (``service.http_server``), a Starlette route that
  hands one message to the streams of a handoff (``POST /push/{handoff_id}``) and a route
  that only answers 200 (``POST /ok``); with ``BENCH_BARE_SPIN`` set to N, that route first
  adds 1 N times (``bench.profile --bare-spin``: the bare route made about as slow as the
  service, to see what the rate alone changes in its cost).
- ``floor``: a ``grpc.aio`` server keeping nothing of its own for a stream
  (``bench.grpc_floor``), with the service's server options: what an idle stream costs
  gRPC alone.

``python -m bench.servers standin|bare|floor`` prints one JSON line with its ports, then
serves until SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bench import grpc_floor
from service.brevo.sandbox import BrevoSandbox
from service.http_server import start_http_server
from service.rpc.generated.handoff.v1 import handoff_pb2 as pb
from service.rpc.generated.handoff.v1 import handoff_pb2_grpc as pb_grpc
from service.rpc.server import SERVER_OPTIONS

STANDIN_API_KEY = "xkeysib-bench-standin-0000000000000000"
SERVICE_AGENT = {"id": "BenchAgent00000001", "name": "Bench Bot", "email": "bot@example.com"}
BRIDGE_AGENT = pb.Agent(id="BenchHuman0000001", name="Marta")


class BareStreams(pb_grpc.HandoffServiceServicer):
    """Streams what ``push`` is given to the open streams of that handoff: no store, no
    parsing beyond the text, no cursor: the floor under the service's own stream path."""

    def __init__(self) -> None:
        self._streams: dict[str, set[asyncio.Queue[pb.StreamAgentRepliesResponse]]] = {}
        self._seq = 0
        self._handoff = pb.GetHandoffResponse(
            handoff=pb.Handoff(id="bare", conversation_id="bare", visitor_id="bare")
        )

    async def GetHandoff(
        self,
        request: pb.GetHandoffRequest,
        context: grpc.aio.ServicerContext[pb.GetHandoffRequest, pb.GetHandoffResponse],
    ) -> pb.GetHandoffResponse:
        """A pre-built answer: the cost of a gRPC unary round trip and nothing else."""
        return self._handoff

    async def StreamAgentReplies(
        self,
        request: pb.StreamAgentRepliesRequest,
        context: grpc.aio.ServicerContext[
            pb.StreamAgentRepliesRequest, pb.StreamAgentRepliesResponse
        ],
    ) -> AsyncIterator[pb.StreamAgentRepliesResponse]:
        queue: asyncio.Queue[pb.StreamAgentRepliesResponse] = asyncio.Queue()
        group = self._streams.setdefault(request.handoff_id, set())
        group.add(queue)
        try:
            # A first item at once, so that the client knows the stream is registered.
            yield pb.StreamAgentRepliesResponse(heartbeat=pb.Heartbeat())
            while True:
                yield await queue.get()
        finally:
            group.discard(queue)

    @staticmethod
    def _now() -> Timestamp:
        stamp = Timestamp()
        stamp.GetCurrentTime()
        return stamp

    def push(self, handoff_id: str, text: str) -> int:
        self._seq += 1
        item = pb.StreamAgentRepliesResponse(
            event=pb.HandoffEvent(
                cursor=f"c1.{self._seq}",
                handoff_id=handoff_id,
                conversation_id=handoff_id,
                occurred_at=self._now(),
                agent_message=pb.AgentMessage(
                    brevo_message_id=f"m{self._seq}", agent=BRIDGE_AGENT, text=text
                ),
            )
        )
        queues = self._streams.get(handoff_id, ())
        for queue in queues:
            queue.put_nowait(item)
        return len(queues)


def _spin(times: int) -> int:
    """CPU work of the interpreter's own, no system call: ``times`` additions."""
    total = 0
    for _ in range(times):
        total += 1
    return total


def bare_app(streams: BareStreams) -> Starlette:
    async def push(request: Request) -> Response:
        # The very fragment the gateway gets; only its first message's text is used.
        body = json.loads(await request.body())
        text = str(body["messages"][0]["text"])
        delivered = streams.push(request.path_params["handoff_id"], text)
        return Response(json.dumps({"delivered": delivered}), media_type="application/json")

    spin = int(os.environ.get("BENCH_BARE_SPIN", "0"))

    async def ok(request: Request) -> Response:
        await request.body()
        if spin:
            _spin(spin)
        return Response(b'{"outcome":"ok"}', media_type="application/json")

    return Starlette(
        routes=[
            Route("/push/{handoff_id}", push, methods=["POST"]),
            Route("/ok", ok, methods=["POST"]),
        ]
    )


# What serves must outlive the function that starts it (a grpc.aio server that nothing
# references is collected, and stops).
_KEEP: list[object] = []


async def serve_bare() -> dict[str, int]:
    streams = BareStreams()  # type: ignore[abstract]  # it serves only the stream
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_HandoffServiceServicer_to_server(streams, server)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    http = await start_http_server(bare_app(streams), "127.0.0.1", 0)
    _KEEP.extend((streams, server, http))
    return {"grpc_port": grpc_port, "http_port": http.port}


async def serve_floor() -> dict[str, int]:
    server = grpc_floor.server(SERVER_OPTIONS)
    grpc_port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    _KEEP.append(server)
    return {"grpc_port": grpc_port}


async def serve_standin() -> dict[str, int]:
    sandbox = BrevoSandbox(api_key=STANDIN_API_KEY, auto_agent=False, service_agent=SERVICE_AGENT)
    http = await start_http_server(sandbox.app, "127.0.0.1", 0)
    _KEEP.extend((sandbox, http))
    return {"http_port": http.port}


SERVERS = {"bare": serve_bare, "standin": serve_standin, "floor": serve_floor}


async def main(kind: str) -> None:
    ports = await SERVERS[kind]()
    sys.stdout.write(json.dumps(ports) + "\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in SERVERS:
        sys.exit("usage: python -m bench.servers bare|standin|floor")
    asyncio.run(main(sys.argv[1]))
