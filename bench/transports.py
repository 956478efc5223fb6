"""``python -m bench.transports [--quick] [--out DIR]`` (``make bench-transports``): the gRPC
server the service is built on, ``grpc.aio``, beside grpclib, a gRPC server in pure Python
on the h2 library, on what ``make bench``'s targets weigh. Every server is a new process of
its own; the clients are grpc.aio's, in processes of their own for the idle streams, in
this one for the rest.

- **idle**: resident memory per open, idle ``StreamAgentReplies`` stream, over none, as
  section 4 of ``make bench`` measures it on a new service process: the service's own
  stream (the core's ``HandoffManager.events`` and the servicer's conversions, on ten
  handoffs of one agent message each, which each stream replays first) served by
  the service's two servers (``GRPC_SERVER=grpcio``, ``grpc.aio``, and ``GRPC_SERVER=grpclib``),
  each in a new process; and each transport's floor,
  a server keeping nothing for a stream (``bench/grpc_floor.py`` for ``grpc.aio``);
- **unary**: a unary call's p50, one call at a time, the two servers taking turns, each
  answering a pre-built reply (the gRPC hop that SendMessage adds to a post to Brevo), and
  each server's CPU a call;
- **send**: the service's ``SendMessage`` on each of its two servers, both in one new
  service process whose Brevo is the built-in sandbox: p50, one call at a
  time, the two taking turns, and the process's CPU a call;
- **push**: each server's CPU a message when each of its open streams is handed messages
  at once (the hop under section 1's webhook -> stream rate), and the messages a second;
  the two servers taking turns, three times each.

Prints each figure as it comes and writes ``transports.json`` to DIR (default
``docs/bench``). ``--quick``: small sizes, the smoke run of ``make test``; its figures mean
nothing. ``python -m bench.transports KIND`` is one of its servers (``service``,
``grpclib-floor``, ``bare-aio``, ``bare-grpclib``): it prints its ports as one JSON line
and serves until killed; a bare server sends each of its streams ``BENCH_PUSH_ROUNDS``
messages on SIGUSR1.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpclib.const import Cardinality, Handler
from grpclib.encoding.base import CodecBase
from grpclib.server import Server, Stream

from bench import grpc_floor
from bench.micro import post_in_process, sandbox_config
from bench.processes import REPO, Proc, free_port, start_json_server
from bench.scenarios import fragment, idle_streams
from gateway.app import create_gateway
from service.__main__ import tune_garbage_collector
from service.app import start_service
from service.core.access import TokenSet
from service.core.handoffs import StartRequest
from service.metrics import Metrics
from service.rpc.generated.handoff.v1 import handoff_pb2 as pb
from service.rpc.grpclib_server import create_grpclib_server

HANDOFF_SERVICE = "handoff.v1.HandoffService"
STREAM_METHOD = f"/{HANDOFF_SERVICE}/StreamAgentReplies"
UNARY_METHOD = f"/{HANDOFF_SERVICE}/GetHandoff"
SEND_METHOD = f"/{HANDOFF_SERVICE}/SendMessage"
# What a bare server answers: a GetHandoff reply, and an agent message as a stream's item.
UNARY_REPLY = pb.GetHandoffResponse(
    handoff=pb.Handoff(id="bare", conversation_id="bare", visitor_id="bare")
).SerializeToString()
PUSHED = pb.StreamAgentRepliesResponse(
    event=pb.HandoffEvent(
        cursor="c1.1",
        handoff_id="bare",
        conversation_id="bare",
        agent_message=pb.AgentMessage(
            brevo_message_id="bare", agent=pb.Agent(id="bare", name="Marta"), text="x" * 100
        ),
    )
).SerializeToString()
IDLE_HANDOFFS = 10
SEND_BLOCK = 50  # SendMessage calls on one transport before the other's turn


@dataclass(frozen=True)
class Sizes:
    idle_counts: tuple[int, ...]
    unary_calls: int
    send_calls: int
    push_streams: int
    push_rounds: int
    push_turns: int


FULL = Sizes(
    idle_counts=(1_000, 10_000),
    unary_calls=3_000,
    send_calls=2_000,
    push_streams=1_000,
    push_rounds=20,
    push_turns=3,
)
QUICK = Sizes(
    idle_counts=(100,),
    unary_calls=100,
    send_calls=100,
    push_streams=50,
    push_rounds=4,
    push_turns=2,
)


class _Raw(CodecBase):
    """grpclib's codec for messages already encoded: bytes in, bytes out."""

    __content_subtype__ = "proto"

    def encode(self, message: Any, message_type: Any) -> bytes:
        return bytes(message)

    def decode(self, data: bytes, message_type: Any) -> Any:
        return data


# --- the servers -------------------------------------------------------------------------


async def _grpclib_server(handlers: Sequence[Any]) -> tuple[Server, int]:
    server = Server(list(handlers), codec=_Raw())
    port = free_port()
    await server.start("127.0.0.1", port)
    return server, port


async def _serve_service() -> None:
    """The service started as ``python -m service`` starts it (its garbage collector tuned
    the same way), on the built-in sandbox and SQLite at ``BENCH_TRANSPORTS_DB``; IDLE_HANDOFFS
    handoffs of one agent message each; and its grpclib server beside its grpc.aio one, on
    the same core."""
    running = await start_service(sandbox_config(Path(os.environ["BENCH_TRANSPORTS_DB"])))
    tune_garbage_collector()
    route = create_gateway(running.manager, TokenSet(["bench"]), 1 << 20, Metrics())
    ids: list[str] = []
    statuses: list[int] = []
    for n in range(IDLE_HANDOFFS):
        handoff, _ = await running.manager.start(StartRequest(f"transports-{n}"))
        ids.append(handoff.id)
        body = fragment(handoff.visitor_id, timed=False)
        statuses.append(await post_in_process(route, "/webhooks/brevo/bench", body))
    if statuses != [200] * IDLE_HANDOFFS:
        raise RuntimeError(f"the idle handoffs' messages were answered {statuses}")
    # The service's own grpclib server (GRPC_SERVER=grpclib) beside its grpc.aio one.
    grpclib = await create_grpclib_server(running.manager, "127.0.0.1", 0)
    print(
        json.dumps({"aio": running.grpc.port, "grpclib": grpclib.port, "handoffs": ids}),
        flush=True,
    )
    await asyncio.Event().wait()


class _Pushed:
    """The open streams of a bare server; SIGUSR1 hands each of them ``rounds`` messages."""

    def __init__(self, rounds: int) -> None:
        self.queues: list[asyncio.Queue[bytes]] = []
        self._rounds = rounds

    def push(self) -> None:
        for _ in range(self._rounds):
            for queue in self.queues:
                queue.put_nowait(PUSHED)


async def _serve_bare(kind: str) -> None:
    """A bare server of ``kind`` (``aio`` or ``grpclib``): GetHandoff answers UNARY_REPLY;
    StreamAgentReplies sends a heartbeat, then what SIGUSR1 pushes."""
    pushed = _Pushed(int(os.environ.get("BENCH_PUSH_ROUNDS", "1")))
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, pushed.push)
    if kind == "aio":

        async def unary(request: bytes, context: Any) -> bytes:
            return UNARY_REPLY

        async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
            queue: asyncio.Queue[bytes] = asyncio.Queue()
            pushed.queues.append(queue)
            yield grpc_floor.HEARTBEAT
            while True:
                yield await queue.get()

        server = grpc.aio.server(options=grpc_floor.PENDING)
        handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {
            "GetHandoff": grpc.unary_unary_rpc_method_handler(unary),
            "StreamAgentReplies": grpc.unary_stream_rpc_method_handler(stream),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(HANDOFF_SERVICE, handlers),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
    else:

        class Bare:
            async def unary(self, call: Stream[bytes, bytes]) -> None:
                await call.recv_message()
                await call.send_message(UNARY_REPLY)

            async def stream(self, call: Stream[bytes, bytes]) -> None:
                await call.recv_message()
                queue: asyncio.Queue[bytes] = asyncio.Queue()
                pushed.queues.append(queue)
                await call.send_message(grpc_floor.HEARTBEAT)
                while True:
                    await call.send_message(await queue.get())

            def __mapping__(self) -> dict[str, Handler]:
                return {
                    UNARY_METHOD: Handler(self.unary, Cardinality.UNARY_UNARY, bytes, bytes),
                    STREAM_METHOD: Handler(self.stream, Cardinality.UNARY_STREAM, bytes, bytes),
                }

        _, port = await _grpclib_server([Bare()])
    print(json.dumps({"grpc_port": port}), flush=True)
    await asyncio.Event().wait()


async def _serve_grpclib_floor() -> None:
    class Floor:
        async def stream(self, call: Stream[bytes, bytes]) -> None:
            await call.recv_message()
            await call.send_message(grpc_floor.HEARTBEAT)
            await asyncio.get_running_loop().create_future()  # resolved by no one

        def __mapping__(self) -> dict[str, Handler]:
            return {STREAM_METHOD: Handler(self.stream, Cardinality.UNARY_STREAM, bytes, bytes)}

    _, port = await _grpclib_server([Floor()])
    print(json.dumps({"grpc_port": port}), flush=True)
    await asyncio.Event().wait()


SERVERS: dict[str, Callable[[], Any]] = {
    "service": _serve_service,
    "grpclib-floor": _serve_grpclib_floor,
    "bare-aio": lambda: _serve_bare("aio"),
    "bare-grpclib": lambda: _serve_bare("grpclib"),
}


# --- the measures ------------------------------------------------------------------------


async def _start(
    kind: str, log_dir: Path, env: dict[str, str] | None = None, name: str | None = None
) -> tuple[Proc, dict[str, Any]]:
    """This module's server ``kind``, logging as ``name`` (default: ``kind``); a service
    keeps its SQLite file beside its log (``run`` empties the folder first)."""
    name = name or kind
    if kind == "service":
        env = {**(env or {}), "BENCH_TRANSPORTS_DB": str(log_dir / f"{name}.db")}
    return await start_json_server(name, log_dir, kind=kind, env=env, module="bench.transports")


async def idle(count: int, log_dir: Path) -> dict[str, Any]:
    """Memory per idle stream at ``count`` streams: the service's on each transport and
    each transport's floor, every one on a new process."""
    figures: dict[str, Any] = {}
    for transport in ("aio", "grpclib"):
        proc, ports = await _start("service", log_dir, name=f"service-{transport}-{count}")
        try:
            await asyncio.sleep(1.0)  # as section 4: what start-up freed settles first
            target = f"127.0.0.1:{ports[transport]}"
            figures[f"service_{transport}"] = await idle_streams(
                proc, target, ports["handoffs"], count, log_dir
            )
        finally:
            await proc.stop()
    figures["floor_aio"] = await asyncio.to_thread(grpc_floor.measure, count)
    proc, ports = await _start("grpclib-floor", log_dir, name=f"grpclib-floor-{count}")
    try:
        await asyncio.sleep(1.0)
        ids = [f"idle-{n}" for n in range(IDLE_HANDOFFS)]
        figures["floor_grpclib"] = await idle_streams(
            proc, f"127.0.0.1:{ports['grpc_port']}", ids, count, log_dir
        )
    finally:
        await proc.stop()
    return figures


async def unary(calls: int, log_dir: Path) -> dict[str, Any]:
    """A unary call's p50 on each bare server, one call at a time, taking turns; and each
    server's CPU a call."""
    procs = {kind: await _start(f"bare-{kind}", log_dir) for kind in ("aio", "grpclib")}
    channels = {
        kind: grpc.aio.insecure_channel(f"127.0.0.1:{ports['grpc_port']}")
        for kind, (_, ports) in procs.items()
    }
    try:
        methods: dict[str, grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = {
            kind: channel.unary_unary(UNARY_METHOD) for kind, channel in channels.items()
        }
        for method in methods.values():  # connected and warm
            for _ in range(max(10, calls // 10)):
                await method(b"")
        latencies: dict[str, list[int]] = {kind: [] for kind in methods}
        cpu_before = {kind: proc.cpu() for kind, (proc, _) in procs.items()}
        for _ in range(calls):
            for kind, method in methods.items():
                started = time.perf_counter_ns()
                reply = await method(b"")
                latencies[kind].append(time.perf_counter_ns() - started)
                if reply != UNARY_REPLY:
                    raise RuntimeError(f"{kind} answered {reply!r}")
        return {
            kind: {
                "calls": calls,
                "p50_ms": round(statistics.median(latencies[kind]) / 1e6, 3),
                "server_cpu_us_per_call": round(
                    (procs[kind][0].cpu() - cpu_before[kind]) / calls * 1e6, 1
                ),
            }
            for kind in methods
        }
    finally:
        for channel in channels.values():
            await channel.close()
        for proc, _ in procs.values():
            await proc.stop()


async def send(calls: int, log_dir: Path) -> dict[str, Any]:
    """The service's ``SendMessage`` on each transport, both served by one new service
    process (Brevo the built-in sandbox, answering at once, in that process too): one call
    at a time, in blocks of SEND_BLOCK calls taking turns; each one's p50 and the process's
    CPU a call."""
    proc, ports = await _start("service", log_dir, name="service-send")
    kinds = ("aio", "grpclib")
    channels = {kind: grpc.aio.insecure_channel(f"127.0.0.1:{ports[kind]}") for kind in kinds}
    try:
        methods: dict[str, grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = {
            kind: channel.unary_unary(SEND_METHOD) for kind, channel in channels.items()
        }
        handoffs: list[str] = ports["handoffs"]
        numbers = itertools.count()

        async def one(kind: str) -> int:
            n = next(numbers)
            request = pb.SendMessageRequest(
                handoff_id=handoffs[n % len(handoffs)],
                client_message_id=f"bench-send-{n}",
                text="a question for the agent",
            ).SerializeToString()
            started = time.perf_counter_ns()
            reply = pb.SendMessageResponse.FromString(await methods[kind](request))
            elapsed = time.perf_counter_ns() - started
            if not reply.brevo_message_id or reply.duplicate:
                raise RuntimeError(f"{kind}: SendMessage answered {reply}")
            return elapsed

        for kind in kinds:  # connected and warm
            for _ in range(SEND_BLOCK):
                await one(kind)
        latencies: dict[str, list[int]] = {kind: [] for kind in kinds}
        cpu = dict.fromkeys(kinds, 0.0)
        for _ in range(max(1, calls // SEND_BLOCK)):
            for kind in kinds:
                before = proc.cpu()
                latencies[kind] += [await one(kind) for _ in range(SEND_BLOCK)]
                cpu[kind] += proc.cpu() - before
        return {
            kind: {
                "calls": len(latencies[kind]),
                "p50_ms": round(statistics.median(latencies[kind]) / 1e6, 3),
                "server_cpu_us_per_call": round(cpu[kind] / len(latencies[kind]) * 1e6, 1),
            }
            for kind in kinds
        }
    finally:
        for channel in channels.values():
            await channel.close()
        await proc.stop()


async def push(streams: int, rounds: int, turns: int, log_dir: Path) -> dict[str, Any]:
    """Each bare server's CPU a message, and the messages a second, when each of
    ``streams`` open streams is handed ``rounds`` messages at once; ``turns`` times a
    server, the two taking turns (both with their streams open), so that a noisy neighbour
    strikes them alike."""
    env = {"BENCH_PUSH_ROUNDS": str(rounds)}
    procs = {kind: await _start(f"bare-{kind}", log_dir, env=env) for kind in ("aio", "grpclib")}
    channels: list[grpc.aio.Channel] = []
    try:
        calls: dict[str, list[Any]] = {}
        for kind, (_, ports) in procs.items():
            opened = [
                grpc.aio.insecure_channel(
                    f"127.0.0.1:{ports['grpc_port']}", [("grpc.use_local_subchannel_pool", 1)]
                )
                for _ in range(max(1, streams // 100))
            ]
            channels += opened
            methods: list[grpc.aio.UnaryStreamMultiCallable[bytes, bytes]] = [
                channel.unary_stream(STREAM_METHOD) for channel in opened
            ]
            calls[kind] = [methods[n % len(methods)](b"") for n in range(streams)]
            firsts = await asyncio.gather(*(call.read() for call in calls[kind]))
            if any(first != grpc_floor.HEARTBEAT for first in firsts):
                raise RuntimeError(f"{kind}: a stream's first item was not a heartbeat")

        async def drain(call: Any) -> int:
            return sum([await call.read() == PUSHED for _ in range(rounds)])

        spent = {kind: [0, 0.0, 0.0] for kind in procs}  # received, seconds, CPU seconds
        for _ in range(turns):
            for kind, (proc, _) in procs.items():
                cpu_before, started = proc.cpu(), time.monotonic()
                proc.process.send_signal(signal.SIGUSR1)
                received = sum(await asyncio.gather(*(drain(call) for call in calls[kind])))
                spent[kind][0] += received
                spent[kind][1] += time.monotonic() - started
                spent[kind][2] += proc.cpu() - cpu_before
        return {
            kind: {
                "streams": streams,
                "messages": streams * rounds * turns,
                "received": int(received),
                "per_s": round(received / seconds, 1),
                "server_cpu_us_per_message": round(cpu / max(received, 1) * 1e6, 1),
            }
            for kind, (received, seconds, cpu) in spent.items()
        }
    finally:
        for channel in channels:
            await channel.close()
        for proc, _ in procs.values():
            await proc.stop()


def _say(text: str) -> None:
    print(f"[transports {time.strftime('%H:%M:%S')}] {text}", flush=True)


async def run(sizes: Sizes, out: Path, quick: bool) -> dict[str, Any]:
    # Each run's logs alone: the smoke test audits them all.
    log_dir = REPO / "build" / ("bench-quick" if quick else "bench") / "transports-logs"
    shutil.rmtree(log_dir, ignore_errors=True)
    results: dict[str, Any] = {
        "quick": quick,
        "python": sys.version.split()[0],
        "grpcio": grpc.__version__,
        "grpclib": _version("grpclib"),
        "h2": _version("h2"),
        "idle": {},
    }
    for count in sizes.idle_counts:
        figures = await idle(count, log_dir)
        results["idle"][str(count)] = figures
        _say(
            f"idle, {count} streams, KiB a stream: service on grpc.aio "
            f"{figures['service_aio']['kib_per_stream']}, on grpclib "
            f"{figures['service_grpclib']['kib_per_stream']}; floors: grpc.aio "
            f"{figures['floor_aio']['kib_per_stream']}, grpclib "
            f"{figures['floor_grpclib']['kib_per_stream']}"
        )
    results["unary"] = await unary(sizes.unary_calls, log_dir)
    for kind, figures in results["unary"].items():
        _say(
            f"unary call on {kind}: p50 {figures['p50_ms']} ms, "
            f"{figures['server_cpu_us_per_call']} µs of server CPU a call"
        )
    results["send"] = await send(sizes.send_calls, log_dir)
    for kind, figures in results["send"].items():
        _say(
            f"the service's SendMessage on {kind}: p50 {figures['p50_ms']} ms, "
            f"{figures['server_cpu_us_per_call']} µs of the process's CPU a call"
        )
    results["push"] = await push(sizes.push_streams, sizes.push_rounds, sizes.push_turns, log_dir)
    for kind, figures in results["push"].items():
        _say(
            f"push to {sizes.push_streams} streams on {kind}: {figures['per_s']} messages/s, "
            f"{figures['server_cpu_us_per_message']} µs of server CPU a message"
        )
    _write(out / "transports.json", results)
    _say(f"wrote {out / 'transports.json'}")
    return results


def _write(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def main(argv: list[str]) -> int:
    if len(argv) == 1 and argv[0] in SERVERS:
        asyncio.run(SERVERS[argv[0]]())
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.transports", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "bench")
    args = parser.parse_args(argv)
    asyncio.run(run(QUICK if args.quick else FULL, args.out, args.quick))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
