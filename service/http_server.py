"""Serving an ASGI app with uvicorn on a socket bound before start-up (port 0 works)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn
from starlette.types import ASGIApp


class _Server(uvicorn.Server):
    """uvicorn.Server without its signal handlers: the service process owns SIGTERM/SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class RunningHttpServer:
    server: uvicorn.Server
    task: asyncio.Task[None]
    host: str
    port: int

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self, grace_s: float = 5.0) -> None:
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), timeout=grace_s)
        except TimeoutError:
            self.server.force_exit = True
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


async def start_http_server(app: ASGIApp, host: str, port: int) -> RunningHttpServer:
    """Binds ``host:port`` (0 picks a free port), starts uvicorn on it and waits until it serves.

    uvicorn's access log is off: webhook paths carry a secret token, and nothing here may
    write it to a log line.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto must be IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted connections only for
    # sockets that say so, and without it every response waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.setblocking(False)
    bound_port = int(sock.getsockname()[1])
    # access_log=False alone is not enough: uvicorn logs access lines anyway whenever its
    # access logger has a handler somewhere up the tree.
    logging.getLogger("uvicorn.access").disabled = True
    config = uvicorn.Config(
        app,
        http="httptools",  # C parser: a third less CPU per webhook than h11 (make bench)
        access_log=False,
        log_config=None,
        lifespan="off",
        timeout_graceful_shutdown=5,
        server_header=False,
        # uvicorn would otherwise take the client address from X-Forwarded-For whenever the
        # peer is 127.0.0.1 (a sidecar, or anyone on the host), and the webhook allow-list
        # would judge a forged address. WEBHOOK_TRUSTED_PROXY_HEADER says when to trust one.
        proxy_headers=False,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            sock.close()
            task.result()
            raise RuntimeError(f"HTTP server on {host}:{bound_port} stopped during start-up")
        await asyncio.sleep(0.005)
    return RunningHttpServer(server=server, task=task, host=host, port=bound_port)
