from __future__ import annotations

import gc
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from redis_server import RedisServer
from support import Harness, close_harness, make_config, open_harness


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One private redis-server for the session; tests keep apart by key prefix."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "redis"])
def store_flags(request: pytest.FixtureRequest) -> tuple[str, ...]:
    """The flags that put the service's state in SQLite, or in the session's Redis under a
    key prefix of this test's own: the service's behaviour must not depend on the store."""
    if request.param == "sqlite":
        return ()
    server: RedisServer = request.getfixturevalue("redis_server")
    return ("--redis-url", server.url, "--redis-key-prefix", f"{{t{secrets.token_hex(6)}}}")


@pytest.fixture
async def harness(tmp_path: Path, store_flags: tuple[str, ...]) -> AsyncIterator[Harness]:
    """The whole service (gRPC, gateway, store, Brevo sandbox) on free loopback ports."""
    h = await open_harness(make_config(tmp_path, *store_flags))
    try:
        yield h
    finally:
        await close_harness(h)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own, to stop and start."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _collect_garbage_after_each_test() -> Iterator[None]:
    """A connection or socket a test leaves open then fails that very test (warnings are
    errors), not whichever later test the garbage collector happens to run in."""
    yield
    gc.collect()
