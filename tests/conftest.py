from __future__ import annotations

import gc
import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from log_audit import AUDIT, AuditHandler
from redis_server import RedisServer
from support import Harness, close_harness, make_config, open_harness

from service.logs import quiet_noisy_loggers

_AUDIT_HANDLER = AuditHandler(AUDIT)


def pytest_sessionstart(session: pytest.Session) -> None:
    """Every record of the test process, down to DEBUG, goes to the log audit; third-party
    loggers are set up as the service process sets them up."""
    root = logging.getLogger()
    root.addHandler(_AUDIT_HANDLER)
    root.setLevel(logging.DEBUG)
    quiet_noisy_loggers()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for module in {item.module for item in items if isinstance(item, pytest.Function)}:
        if module is not None:
            AUDIT.add_module_secrets(module)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    logging.getLogger().removeHandler(_AUDIT_HANDLER)
    leaks = AUDIT.leaks()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    sources = len({source for source, _ in AUDIT.lines})
    if reporter is not None:
        reporter.write_line(
            f"log audit: {len(AUDIT.lines)} log lines from {sources} source(s) checked "
            f"against {len(AUDIT.secrets)} secrets and 2 key shapes: {len(leaks)} leak(s)"
        )
        for leak in leaks[:20]:
            reporter.write_line(f"  SECRET IN A LOG LINE: {leak.describe()}", red=True)
    if leaks:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


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
async def sqlite_harness(tmp_path: Path) -> AsyncIterator[Harness]:
    """The whole service on SQLite alone, for what does not depend on the store."""
    h = await open_harness(make_config(tmp_path))
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
