"""A lean HTTP/1.1 load driver: keep-alive connections on asyncio streams, so that the
driver costs little next to the server it measures (httpx costs several times more per
request). Enough for POSTs of JSON to the gateway and its baselines; not a general client.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class HttpConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    @classmethod
    async def open(cls, host: str, port: int) -> HttpConnection:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        self._writer.write(
            b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body)
        )
        head = await self._reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self._reader.readexactly(length)

    async def close(self) -> None:
        self._writer.close()
        await self._writer.wait_closed()


@dataclass
class LoadResult:
    requests: int = 0
    seconds: float = 0.0
    latencies_ns: list[int] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    server_cpu_s: float = 0.0  # CPU the server used meanwhile, where measured
    # Where rounds were merged: each round's own result, in order (a drift from one to the
    # next is the server's: the service's store grows from round to round).
    rounds: list[LoadResult] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


Request = Callable[[int], tuple[str, bytes]]  # n -> (path, body)


async def closed_loop(
    host: str, port: int, request: Request, *, connections: int, seconds: float
) -> LoadResult:
    """``connections`` clients, each posting its next request as soon as the last one was
    answered, for ``seconds``."""
    result = LoadResult()
    conns = [await HttpConnection.open(host, port) for _ in range(connections)]
    counter = iter(range(10**12))
    deadline = time.monotonic() + seconds

    async def worker(conn: HttpConnection) -> None:
        while time.monotonic() < deadline:
            path, body = request(next(counter))
            sent = time.monotonic_ns()
            status, _ = await conn.post(path, body)
            result.latencies_ns.append(time.monotonic_ns() - sent)
            result.statuses[status] = result.statuses.get(status, 0) + 1

    started = time.monotonic()
    try:
        await asyncio.gather(*(worker(c) for c in conns))
    finally:
        result.seconds = time.monotonic() - started
        for conn in conns:
            await conn.close()
    result.requests = len(result.latencies_ns)
    return result


async def paced(
    host: str, port: int, request: Request, *, rate: float, seconds: float, connections: int = 8
) -> LoadResult:
    """Requests at a steady ``rate`` per second for ``seconds`` (open loop: the schedule
    does not wait for answers, up to ``connections`` in flight)."""
    result = LoadResult()
    conns: asyncio.Queue[HttpConnection] = asyncio.Queue()
    for _ in range(connections):
        conns.put_nowait(await HttpConnection.open(host, port))
    total = max(1, round(rate * seconds))
    tasks: list[asyncio.Task[None]] = []

    async def one(n: int) -> None:
        conn = await conns.get()
        try:
            path, body = request(n)
            sent = time.monotonic_ns()
            status, _ = await conn.post(path, body)
            result.latencies_ns.append(time.monotonic_ns() - sent)
            result.statuses[status] = result.statuses.get(status, 0) + 1
        finally:
            conns.put_nowait(conn)

    started = time.monotonic()
    for n in range(total):
        delay = started + n / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(n)))
    await asyncio.gather(*tasks)
    result.seconds = time.monotonic() - started
    result.requests = len(result.latencies_ns)
    while not conns.empty():
        await conns.get_nowait().close()
    return result
