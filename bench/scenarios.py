"""What the benchmark measures, each beside its baseline on the same machine in the same run.

Every scenario returns plain figures (numbers and short lists) for the report. Latencies
are taken from the moment the driver writes a request to the moment the stream client
reads the message (CLOCK_MONOTONIC, one clock for every process of the machine).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import httpx

from bench.http_load import LoadResult, closed_loop, paced
from bench.processes import Proc, ServiceProc, StreamClients
from bench.servers import BRIDGE_AGENT, SERVICE_AGENT, STANDIN_API_KEY
from service.rpc.generated.handoff.v1 import handoff_pb2 as pb
from service.rpc.generated.handoff.v1 import handoff_pb2_grpc as pb_grpc

HOST = "127.0.0.1"
CREATED_AT = 1767226000000


@dataclass(frozen=True)
class Sizes:
    stream_counts: tuple[int, ...] = (1, 100, 1000)
    latency_rate: float = 200.0  # webhooks per second offered while latency is measured
    latency_s: float = 5.0
    rate_s: float = 3.0  # a round; webhook-to-stream runs take turns with their baseline
    rate_connections: int = 16
    ingest_s: float = 3.0  # a round; ingest runs take turns with their baseline
    rounds: int = 3
    send_calls: int = 500
    send_s: float = 5.0
    send_concurrency: int = 16
    idle_counts: tuple[int, ...] = (1000, 10_000)
    redis_streams: int = 100


FULL = Sizes()
QUICK = Sizes(
    stream_counts=(1, 10),
    latency_rate=50.0,
    latency_s=1.0,
    rate_s=1.0,
    rate_connections=4,
    ingest_s=1.0,
    rounds=2,
    send_calls=30,
    send_s=1.0,
    send_concurrency=4,
    idle_counts=(100,),
    redis_streams=10,
)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(values_ns: list[int]) -> list[float]:
    return [v / 1e6 for v in values_ns]


def latency_figures(latencies_ms: list[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile(latencies_ms, 0.50), 3),
        "p99_ms": round(percentile(latencies_ms, 0.99), 3),
        "mean_ms": round(statistics.fmean(latencies_ms), 3) if latencies_ms else float("nan"),
    }


def cdf_points(latencies_ms: list[float], points: int = 200) -> list[float]:
    """The latency at ``points`` evenly spaced quantiles: enough to draw the curve."""
    ordered = sorted(latencies_ms)
    if not ordered:
        return []
    return [ordered[round(i * (len(ordered) - 1) / (points - 1))] for i in range(points)]


_ids = itertools.count()


def fragment(visitor_id: str, *, timed: bool = True) -> bytes:
    """A conversationFragment with one agent message whose text carries the time it is
    posted (``bench:<ns>``; not ``timed``: a warm-up), as Brevo would send it."""
    n = next(_ids)
    text = f"bench:{time.monotonic_ns()} a reply from the agent" if timed else "warm-up"
    return json.dumps(
        {
            "eventName": "conversationFragment",
            "conversationId": f"bench-chat-{visitor_id}",
            "messages": [
                {
                    "id": f"bench-m{n}",
                    "type": "agent",
                    "text": text,
                    "createdAt": CREATED_AT + n,
                    "agentId": BRIDGE_AGENT.id,
                    "agentName": BRIDGE_AGENT.name,
                }
            ],
            "visitor": {"id": visitor_id},
        }
    ).encode()


@dataclass
class Target:
    """Where a webhook-to-stream run posts and streams: the service, or the bare baseline."""

    name: str
    grpc_target: str
    http_port: int
    path_of: Callable[[int], str]  # handoff index -> the path to post to
    handoffs: list[str]  # what the streams subscribe to
    visitors: list[str]  # the visitor id of each handoff (what a fragment names)
    server: Proc
    warm_up: Callable[[], Awaitable[None]] | None = None  # gives every stream a first item


async def open_handoffs(service: ServiceProc, count: int, tag: str) -> tuple[list[str], list[str]]:
    """StartHandoff ``count`` times (16 at a time); returns their ids and visitor ids."""
    ids: list[str] = [""] * count
    visitors: list[str] = [""] * count
    async with grpc.aio.insecure_channel(service.grpc_target) as channel:
        stub = pb_grpc.HandoffServiceStub(channel)
        gate = asyncio.Semaphore(16)

        async def one(n: int) -> None:
            async with gate:
                reply = await stub.StartHandoff(
                    pb.StartHandoffRequest(conversation_id=f"bench-{tag}-{n}", title="benchmark")
                )
            ids[n], visitors[n] = reply.handoff.id, reply.handoff.visitor_id

        await asyncio.gather(*(one(n) for n in range(count)))
    return ids, visitors


def service_target(
    service: ServiceProc, handoffs: list[str], visitors: list[str], name: str
) -> Target:
    async def warm_up() -> None:
        # One agent message per handoff: a new stream replays it as its first item.
        await paced(
            HOST,
            service.http_port,
            lambda n: (service.webhook_path, fragment(visitors[n], timed=False)),
            rate=2000,
            seconds=len(visitors) / 2000,
        )

    return Target(
        name,
        service.grpc_target,
        service.http_port,
        lambda n: service.webhook_path,
        handoffs,
        visitors,
        service,
        warm_up,
    )


def bare_target(bare: Proc, ports: dict[str, Any], streams: int) -> Target:
    handoffs = [f"bare-{n}" for n in range(streams)]
    return Target(
        "bare",
        f"{HOST}:{ports['grpc_port']}",
        int(ports["http_port"]),
        lambda n: f"/push/{handoffs[n]}",
        handoffs,
        handoffs,
        bare,
    )


async def wait_count(clients: StreamClients, expected: int, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        count = int((await clients.command(cmd="count"))["messages"])
        if count >= expected or time.monotonic() > deadline:
            return count
        await asyncio.sleep(0.05)


async def _open_streams(target: Target, log_dir: Path) -> StreamClients:
    """A stream client process with one stream per handoff of ``target``, each past its
    first item."""
    streams = len(target.handoffs)
    if target.warm_up is not None:
        await target.warm_up()
    clients = await StreamClients.start(target.grpc_target, log_dir, f"streams-{target.name}")
    try:
        opened = await clients.command(
            cmd="open",
            handoffs=target.handoffs,
            per_handoff=1,
            channels=max(1, streams // 100),
        )
        if opened["opened"] != streams or opened["errors"]:
            raise RuntimeError(f"{target.name}: streams did not open: {opened}")
    except BaseException:
        await clients.close()
        raise
    return clients


def _request_of(target: Target) -> Callable[[int], tuple[str, bytes]]:
    """Webhooks round-robin over the target's handoffs."""
    streams = len(target.handoffs)

    def request(n: int) -> tuple[str, bytes]:
        k = n % streams
        return target.path_of(k), fragment(target.visitors[k])

    return request


@dataclass
class _Sustained:
    """What the sustained-rate runs of one target add up to, over their rounds."""

    rounds: int = 0
    posted: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    delivered: int = 0
    seconds: float = 0.0  # from each round's first post to its last message read
    cpu_s: float = 0.0
    post_latencies_ns: list[int] = field(default_factory=list)
    errors: int = 0
    resumes: int = 0


async def _sustained_round(
    target: Target, clients: StreamClients, sizes: Sizes, total: _Sustained
) -> None:
    await clients.command(cmd="reset")
    cpu_before = target.server.cpu()
    started_ns = time.monotonic_ns()
    load = await closed_loop(
        HOST,
        target.http_port,
        _request_of(target),
        connections=sizes.rate_connections,
        seconds=sizes.rate_s,
    )
    delivered = await wait_count(clients, load.statuses.get(200, 0))
    total.cpu_s += target.server.cpu() - cpu_before
    report = await clients.command(cmd="report")
    arrivals: list[int] = report["arrivals_ns"]
    total.seconds += (max(arrivals) - started_ns) / 1e9 if arrivals else float("nan")
    total.rounds += 1
    total.posted += load.requests
    for status, count in load.statuses.items():
        total.statuses[status] = total.statuses.get(status, 0) + count
    total.delivered += delivered
    total.post_latencies_ns += load.latencies_ns
    total.errors += report["error_count"]
    total.resumes += report["resumes"]


async def webhook_to_stream(
    targets: list[Target], sizes: Sizes, log_dir: Path
) -> list[dict[str, Any]]:
    """Each stream follows a handoff of its own; webhooks go round-robin over the handoffs.
    One result per target, in order.

    Every target's streams are open at once. Latency: at a steady ``latency_rate``, one
    target after the other. Sustained rate: ``rate_connections`` posting as fast as
    answers come, for ``rate_s``, the targets taking turns ``rounds`` times over, so that
    a noisy neighbour strikes them alike; the rate counts messages the streams received,
    from each round's first post to its last message read.
    """
    clients: list[StreamClients] = []
    try:
        for target in targets:
            clients.append(await _open_streams(target, log_dir))
        latencies: list[tuple[LoadResult, int, dict[str, Any]]] = []
        for target, client in zip(targets, clients, strict=True):
            await client.command(cmd="reset")
            lat = await paced(
                HOST,
                target.http_port,
                _request_of(target),
                rate=sizes.latency_rate,
                seconds=sizes.latency_s,
            )
            received = await wait_count(client, lat.statuses.get(200, 0))
            latencies.append((lat, received, await client.command(cmd="report")))
        sustained = [_Sustained() for _ in targets]
        for _ in range(sizes.rounds):
            for target, client, total in zip(targets, clients, sustained, strict=True):
                await _sustained_round(target, client, sizes, total)
        rss = [target.server.rss() for target in targets]
    finally:
        for client in clients:
            await client.close()
    results = []
    for target, (lat, received, latency_report), total, server_rss in zip(
        targets, latencies, sustained, rss, strict=True
    ):
        latency_ms = ms(latency_report["latencies_ns"])
        results.append(
            {
                "streams": len(target.handoffs),
                "latency_offered_per_s": sizes.latency_rate,
                "latency_messages": received,
                "latency_posted": lat.requests,
                **latency_figures(latency_ms),
                "latency_cdf_ms": cdf_points(latency_ms),
                "rate_rounds": total.rounds,
                "rate_posted": total.posted,
                "rate_acknowledged": total.statuses.get(200, 0),
                "rate_statuses": {str(k): v for k, v in total.statuses.items()},
                "rate_delivered": total.delivered,
                "events_per_s": round(total.delivered / total.seconds, 1),
                "post_p50_ms": round(percentile(ms(total.post_latencies_ns), 0.5), 3),
                "server_cpu_us_per_event": round(total.cpu_s / max(total.delivered, 1) * 1e6, 1),
                "server_rss_mib": round(server_rss / 2**20, 1),
                "stream_errors": total.errors + latency_report["error_count"],
                "stream_resumes": total.resumes + latency_report["resumes"],
            }
        )
    return results


async def ingest(
    port: int, path_of: Callable[[int], str], visitors: list[str], sizes: Sizes
) -> LoadResult:
    """Fragments posted as fast as answers come, no stream open."""
    return await closed_loop(
        HOST,
        port,
        lambda n: (path_of(n), fragment(visitors[n % len(visitors)])),
        connections=sizes.rate_connections,
        seconds=sizes.ingest_s,
    )


# port, path of n, visitors, and the server process (for the CPU it uses)
IngestTarget = tuple[int, Callable[[int], str], list[str], Proc]


async def ingest_side_by_side(targets: list[IngestTarget], sizes: Sizes) -> list[LoadResult]:
    """``ingest`` on each target in turn, ``sizes.rounds`` times over, so that a noisy
    neighbour strikes them alike; one merged result per target, in order."""
    merged = [LoadResult() for _ in targets]
    for _ in range(sizes.rounds):
        for total, (port, path_of, visitors, server) in zip(merged, targets, strict=True):
            cpu_before = server.cpu()
            one = await ingest(port, path_of, visitors, sizes)
            one.server_cpu_s = server.cpu() - cpu_before
            total.rounds.append(one)
            total.server_cpu_s += one.server_cpu_s
            total.requests += one.requests
            total.seconds += one.seconds
            total.latencies_ns += one.latencies_ns
            for status, count in one.statuses.items():
                total.statuses[status] = total.statuses.get(status, 0) + count
    return merged


def _rate_figures(result: LoadResult, ok_status: int) -> dict[str, Any]:
    acknowledged = result.statuses.get(ok_status, 0)
    return {
        "acknowledged": acknowledged,
        "per_s": round(acknowledged / result.seconds, 1),
        "server_cpu_us_per_request": round(result.server_cpu_s / max(result.requests, 1) * 1e6, 1),
    }


def ingest_figures(result: LoadResult, ok_status: int = 200) -> dict[str, Any]:
    lat = ms(result.latencies_ns)
    return {
        "requests": result.requests,
        "statuses": {str(k): v for k, v in result.statuses.items()},
        **_rate_figures(result, ok_status),
        "p50_ms": round(percentile(lat, 0.5), 3),
        "p99_ms": round(percentile(lat, 0.99), 3),
        "rounds": [_rate_figures(one, ok_status) for one in result.rounds],
    }


async def send_side_by_side(
    service: ServiceProc,
    handoffs: list[str],
    standin_port: int,
    bare_grpc_target: str,
    sizes: Sizes,
) -> dict[str, dict[str, Any]]:
    """SendMessage beside httpx posting the same body to the stand-in directly; for
    reference, beside aiohttp posting it (the HTTP client the service itself uses) and a
    unary call to the bare grpc.aio server (what the gRPC hop alone costs).

    Latency: one call at a time, the four kinds taking turns, so that a noisy neighbour
    strikes them alike. Rate: ``send_concurrency`` callers (each SendMessage caller on a
    handoff of its own: a handoff's sends are serialised), the service, then direct.
    """
    counter = itertools.count()
    async with (
        grpc.aio.insecure_channel(service.grpc_target) as channel,
        grpc.aio.insecure_channel(bare_grpc_target) as bare_channel,
        httpx.AsyncClient(
            base_url=f"http://{HOST}:{standin_port}/v3",
            headers={"api-key": STANDIN_API_KEY, "accept": "application/json"},
            timeout=10,
        ) as http,
        aiohttp.ClientSession(
            headers={"api-key": STANDIN_API_KEY, "accept": "application/json"},
            timeout=aiohttp.ClientTimeout(total=10),
        ) as lean,
    ):
        stub = pb_grpc.HandoffServiceStub(channel)
        bare_stub = pb_grpc.HandoffServiceStub(bare_channel)
        # The direct post goes to a visitor the stand-in knows: the first handoff's.
        first = await stub.GetHandoff(pb.GetHandoffRequest(handoff_id=handoffs[0]))
        visitor_id = first.handoff.visitor_id
        hop_request = pb.GetHandoffRequest(handoff_id="bare")

        async def send(handoff_id: str) -> int:
            n = next(counter)
            started = time.monotonic_ns()
            reply = await stub.SendMessage(
                pb.SendMessageRequest(
                    handoff_id=handoff_id, client_message_id=f"c{n}", text=f"user message {n}"
                )
            )
            assert not reply.duplicate
            return time.monotonic_ns() - started

        def body(n: int) -> dict[str, str]:
            return {
                "visitorId": visitor_id,
                "text": f"Botpress User: user message {n}",
                "receivedFrom": "handoff-service",
                "agentId": SERVICE_AGENT["id"],
            }

        async def direct() -> int:
            n = next(counter)
            started = time.monotonic_ns()
            response = await http.post("/conversations/messages", json=body(n))
            assert response.status_code == 200, response.text
            response.json()
            return time.monotonic_ns() - started

        messages_url = f"http://{HOST}:{standin_port}/v3/conversations/messages"

        async def direct_aiohttp() -> int:
            n = next(counter)
            started = time.monotonic_ns()
            async with lean.post(messages_url, json=body(n)) as response:
                assert response.status == 200, await response.text()
                await response.json()
            return time.monotonic_ns() - started

        async def hop() -> int:
            started = time.monotonic_ns()
            await bare_stub.GetHandoff(hop_request)
            return time.monotonic_ns() - started

        kinds: dict[str, Callable[[], Awaitable[int]]] = {
            "service": functools.partial(send, handoffs[0]),
            "direct": direct,
            "direct_aiohttp": direct_aiohttp,
            "hop": hop,
        }
        for _ in range(10):  # warm the connections
            for call in kinds.values():
                await call()
        sequential: dict[str, list[int]] = {kind: [] for kind in kinds}
        for _ in range(sizes.send_calls):
            for kind, call in kinds.items():
                sequential[kind].append(await call())
        ours = await _concurrently(
            [functools.partial(send, h) for h in handoffs[: sizes.send_concurrency]], sizes.send_s
        )
        theirs = await _concurrently([direct] * sizes.send_concurrency, sizes.send_s)
    return {
        "service": _call_figures(sequential["service"], ours, sizes.send_s),
        "direct": _call_figures(sequential["direct"], theirs, sizes.send_s),
        "direct_aiohttp": {
            "sequential_calls": len(sequential["direct_aiohttp"]),
            **latency_figures(ms(sequential["direct_aiohttp"])),
        },
        "grpc_hop": {
            "sequential_calls": len(sequential["hop"]),
            **latency_figures(ms(sequential["hop"])),
        },
    }


async def _concurrently(callers: list[Callable[[], Awaitable[int]]], seconds: float) -> list[int]:
    latencies: list[int] = []
    deadline = time.monotonic() + seconds

    async def worker(caller: Callable[[], Awaitable[int]]) -> None:
        while time.monotonic() < deadline:
            latencies.append(await caller())

    await asyncio.gather(*(worker(c) for c in callers))
    return latencies


def _call_figures(sequential: list[int], concurrent: list[int], seconds: float) -> dict[str, Any]:
    return {
        "sequential_calls": len(sequential),
        **latency_figures(ms(sequential)),
        "concurrent_calls": len(concurrent),
        "calls_per_s": round(len(concurrent) / seconds, 1),
        "concurrent_p50_ms": round(percentile(ms(concurrent), 0.5), 3),
    }


async def idle_streams(
    server: Proc, grpc_target: str, handoffs: list[str], count: int, log_dir: Path
) -> dict[str, Any]:
    """The server's resident memory with ``count`` idle streams requested, over none, per
    stream open (those the clients still hold once every stream has its first item)."""
    before = server.rss()
    clients = await StreamClients.start(grpc_target, log_dir, f"idle-{server.name}-{count}")
    try:
        per_handoff = max(1, count // len(handoffs))
        opened = await clients.command(
            timeout_s=600,
            cmd="open",
            handoffs=handoffs[: count // per_handoff],
            per_handoff=per_handoff,
            channels=max(1, count // 100),
        )
        await asyncio.sleep(1.0)
        with_streams = server.rss()
    finally:
        await clients.close()
    await asyncio.sleep(1.0)
    return {
        "requested": count,
        "streams": opened["opened"],
        "errors": opened["errors"],
        "rss_before_mib": round(before / 2**20, 1),
        "rss_with_streams_mib": round(with_streams / 2**20, 1),
        "rss_after_close_mib": round(server.rss() / 2**20, 1),
        "kib_per_stream": round((with_streams - before) / max(opened["opened"], 1) / 1024, 2),
    }
