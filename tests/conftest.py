from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support import Harness, close_harness, make_config, open_harness


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    """The whole service (gRPC, gateway, SQLite, Brevo sandbox) on free loopback ports."""
    h = await open_harness(make_config(tmp_path))
    try:
        yield h
    finally:
        await close_harness(h)
