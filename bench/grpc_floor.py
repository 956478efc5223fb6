"""The floor under an idle stream's memory: a ``grpc.aio`` server that keeps nothing of its
own for a stream (it sends one heartbeat, then waits on a future no one resolves), so that
what an open stream costs it is gRPC's alone: the C core's call, its HTTP/2 stream and
grpc.aio's objects for the call.

``make bench`` runs it as a server of its own (``python -m bench.servers floor``) beside the
service and the bare baseline, and reads its memory with the same stream clients. Standing
alone it needs nothing but ``grpcio`` (neither the contract's stubs nor protobuf), so that
any release of grpcio can be measured with it (``make bench-grpc-floor``):

- ``python bench/grpc_floor.py [--streams N] [--python-share]``: starts the server and a
  client process, opens N streams (100 a connection), and prints one JSON line: the grpcio
  version, the streams open and the server's resident memory per stream, over none; with
  ``--python-share``, also the share of it that is Python's objects (grpc.aio's, for the
  call), counted by tracemalloc on a second new server with the same streams (tracemalloc
  costs memory of its own, so the first server's figures are taken without it): the rest
  is the C core's, and the allocators' own overhead;
- ``python bench/grpc_floor.py serve [--traced]``: the server alone; prints
  ``{"grpc_port": ...}``, serves until killed; ``--traced``: tracemalloc counts its Python
  allocations, and SIGUSR1 makes it print ``{"traced_bytes": ...}``;
- ``python bench/grpc_floor.py client PORT N CHANNELS``: opens the streams, prints
  ``{"opened": n}`` once each had its first item, and holds them until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

METHOD = "/handoff.v1.HandoffService/StreamAgentReplies"
# StreamAgentRepliesResponse(heartbeat=Heartbeat()) encoded (field 2, empty): the clients of
# make bench read it as the contract's first item (tests/test_bench.py checks the bytes).
HEARTBEAT = b"\x12\x00"
# gRPC cancels calls waiting to be taken up past 1,000 by default (see service/rpc/server.py's
# MAX_PENDING_CALLS): a burst of 10,000 streams needs more.
PENDING = [
    ("grpc.server.max_pending_requests", 20_000),
    ("grpc.server.max_pending_requests_hard_limit", 20_000),
]


async def _stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
    yield HEARTBEAT
    await asyncio.get_running_loop().create_future()  # resolved by no one: idle until cancelled


def server(options: Sequence[tuple[str, Any]] = PENDING) -> grpc.aio.Server:
    """The floor's server, not started; it listens on nothing yet."""
    server = grpc.aio.server(options=list(options))
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_stream_rpc_method_handler(
        _stream  # bytes in, bytes out
    )
    service, method = METHOD.rsplit("/", 1)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.lstrip("/"), {method: handler}),)
    )
    return server


async def _serve(traced: bool) -> None:
    if traced:
        tracemalloc.start()

        def report() -> None:
            print(json.dumps({"traced_bytes": tracemalloc.get_traced_memory()[0]}), flush=True)

        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, report)
    floor = server()
    port = floor.add_insecure_port("127.0.0.1:0")
    await floor.start()
    print(json.dumps({"grpc_port": port}), flush=True)
    await asyncio.Event().wait()  # until killed: measure() takes its figure first


async def _client(port: int, streams: int, channels: int) -> None:
    opened = [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", [("grpc.use_local_subchannel_pool", 1)])
        for _ in range(channels)
    ]
    methods: list[Any] = [channel.unary_stream(METHOD) for channel in opened]
    calls = [methods[n % channels](b"") for n in range(streams)]

    async def first(call: Any) -> bool:
        try:
            return bool(await call.read() == HEARTBEAT)
        except grpc.RpcError:  # not open: counted out
            return False

    firsts = await asyncio.gather(*(first(call) for call in calls))
    print(json.dumps({"opened": sum(firsts)}), flush=True)
    await asyncio.Event().wait()  # the streams held until killed


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _with_streams(
    streams: int, read: Callable[[subprocess.Popen[str]], int], traced: bool = False
) -> tuple[int, int, int]:
    """On a new server process (``traced``: with tracemalloc), ``read(server)`` before and
    after ``streams`` streams are opened on it over ``streams / 100`` connections from a
    client process; and how many opened."""
    me = [sys.executable, __file__]
    serve = [*me, "serve", *(["--traced"] if traced else [])]
    serving = subprocess.Popen(serve, stdout=subprocess.PIPE, text=True)  # noqa: S603
    try:
        assert serving.stdout is not None
        port = json.loads(serving.stdout.readline())["grpc_port"]
        time.sleep(1.0)
        before = read(serving)
        channels = max(1, streams // 100)
        client = subprocess.Popen(  # noqa: S603 (this file, with numbers)
            [*me, "client", str(port), str(streams), str(channels)],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert client.stdout is not None
            line = client.stdout.readline()
            if not line:
                raise RuntimeError("the floor's client process ended before opening its streams")
            opened = int(json.loads(line)["opened"])
            time.sleep(1.0)
            after = read(serving)
        finally:
            client.kill()  # the measure is taken: the streams need no closing one by one
            client.wait(30)
    finally:
        serving.kill()  # likewise: a graceful stop would cancel each call, noisily
        serving.wait(30)
    return before, after, opened


def _rss_of(serving: subprocess.Popen[str]) -> int:
    return _rss(serving.pid)


def _traced_of(serving: subprocess.Popen[str]) -> int:
    assert serving.stdout is not None
    serving.send_signal(signal.SIGUSR1)
    return int(json.loads(serving.stdout.readline())["traced_bytes"])


def measure(streams: int, python_share: bool = False) -> dict[str, Any]:
    """The server's resident memory per open stream, ``streams`` open at once over
    ``streams / 100`` connections from a client process, on a new server process; with
    ``python_share``, also the Python objects' share of it (on another new server)."""
    before, with_streams, opened = _with_streams(streams, _rss_of)
    figures: dict[str, Any] = {
        "grpcio": grpc.__version__,
        "python": sys.version.split()[0],
        "requested": streams,
        "streams": opened,
        "rss_before_mib": round(before / 2**20, 1),
        "rss_with_streams_mib": round(with_streams / 2**20, 1),
        "kib_per_stream": round((with_streams - before) / max(opened, 1) / 1024, 2),
    }
    if python_share:
        traced_before, traced_after, traced_opened = _with_streams(streams, _traced_of, True)
        figures["python_streams"] = traced_opened
        figures["python_kib_per_stream"] = round(
            (traced_after - traced_before) / max(traced_opened, 1) / 1024, 2
        )
    return figures


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"] and argv[1:] in ([], ["--traced"]):
        asyncio.run(_serve(traced=argv[1:] == ["--traced"]))
        return 0
    if argv[:1] == ["client"] and len(argv) == 4:
        asyncio.run(_client(int(argv[1]), int(argv[2]), int(argv[3])))
        return 0
    parser = argparse.ArgumentParser(prog="python bench/grpc_floor.py", description=__doc__)
    parser.add_argument("--streams", type=int, default=10_000, help="streams to open")
    parser.add_argument(
        "--python-share",
        action="store_true",
        help="also count the Python objects' share (tracemalloc, on a second new server)",
    )
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.streams, args.python_share)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
