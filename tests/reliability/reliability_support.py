"""Shared by the reliability tests: the service on an event loop of its own thread (for
synchronous hypothesis tests), a watch on error log records, and the figures each test
records for the docs (``record_property`` and ``build/reliability/<test>.json``)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import gc
import json
import logging
import os
import re
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest
from support import Harness, close_harness, open_harness

from service.config import Config

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
FIGURES_DIR = REPO / "build" / "reliability"


def record_figures(
    request: pytest.FixtureRequest,
    record_property: Callable[[str, object], None],
    figures: dict[str, object],
) -> Path:
    """Adds ``figures`` to the test's report properties and writes them, as one JSON line,
    to ``build/reliability/<test name>.json`` for the docs generator (``<test name>-grpclib``
    with the service on grpclib)."""
    name = request.node.name
    server = os.environ.get("GRPC_SERVER", "grpcio")
    if server != "grpcio":  # make test's second pass: its figures beside the first's
        name += f"-{server}"
    figures = {**figures, "grpc_server": server}
    for key, value in figures.items():
        record_property(key, value)
    FIGURES_DIR.mkdir(parents=True, exist_ok=True)
    path = FIGURES_DIR / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', name).strip('-')}.json"
    path.write_text(json.dumps({"test": request.node.nodeid, **figures}, sort_keys=True) + "\n")
    return path


def rss_bytes(trim: bool = True) -> int:
    """This process's resident set size (VmRSS in /proc/self/status). With ``trim``, first
    collects garbage and has glibc hand freed heap pages back (malloc_trim), so that the
    figure counts memory in use rather than memory the allocator keeps for later."""
    if trim:
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


class ErrorLogWatch(logging.Handler):
    """Keeps every record at ERROR or above, and any record carrying a traceback, from any
    logger of the process (service.*, gateway.*, uvicorn, grpc, asyncio): a request the
    service turned into a 5xx or an INTERNAL leaves one, and so does an exception that
    escaped into the event loop."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if (
            record.levelno >= logging.ERROR
            or record.exc_info is not None
            or "Traceback" in record.getMessage()
        ):
            self.records.append(record)

    def describe(self, start: int = 0) -> str:
        return "; ".join(
            f"{r.name} {r.levelname}: {r.getMessage()[:200]}"
            + (
                f" ({r.exc_info[0].__name__}: {r.exc_info[1]})"
                if r.exc_info and r.exc_info[0]
                else ""
            )
            for r in self.records[start:]
        )


@contextmanager
def watch_error_logs() -> Iterator[ErrorLogWatch]:
    watch = ErrorLogWatch()
    root = logging.getLogger()
    root.addHandler(watch)
    try:
        yield watch
    finally:
        root.removeHandler(watch)


class ServiceThread:
    """The whole service (``open_harness``: gRPC, gateway, SQLite, sandbox) on an event loop
    running in a thread of its own, so that synchronous code (a hypothesis test) can drive
    it with ``run``: each call runs one coroutine on that loop, over real loopback sockets.
    """

    def __init__(self, config: Config) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="service-loop", daemon=True
        )
        self._thread.start()
        try:
            self.harness: Harness = self.run(open_harness(config))
        except BaseException:
            self._stop_loop()
            raise

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise AssertionError(f"the service did not answer within {timeout_s} s") from None

    def call(self, make: Callable[[], Awaitable[T]], timeout_s: float = 30.0) -> T:
        """Awaits ``make()`` on the service's loop: for what must be created there, such as
        a gRPC call on the harness's channel."""

        async def inside() -> T:
            return await make()

        return self.run(inside(), timeout_s)

    def close(self) -> None:
        try:
            self.run(close_harness(self.harness))
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        async def finish() -> None:
            current = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.loop.shutdown_asyncgens()
            await self.loop.shutdown_default_executor()

        try:
            self.run(finish())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
