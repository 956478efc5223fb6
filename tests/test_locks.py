"""KeyedLocks: one holder per key at a time, and no lock left behind however a holder ends."""

from __future__ import annotations

import asyncio

import pytest

from service.core.locks import KeyedLocks


async def test_holders_of_one_key_take_turns_and_other_keys_do_not_wait() -> None:
    locks = KeyedLocks()
    order: list[str] = []
    first_inside = asyncio.Event()
    release_first = asyncio.Event()

    async def first() -> None:
        async with locks.hold("a"):
            order.append("first in")
            first_inside.set()
            await release_first.wait()
            order.append("first out")

    async def second() -> None:
        await first_inside.wait()
        async with locks.hold("a"):
            order.append("second in")

    async def other_key() -> None:
        await first_inside.wait()
        async with locks.hold("b"):
            order.append("other key in")

    tasks = [asyncio.create_task(f()) for f in (first, second, other_key)]
    await first_inside.wait()
    for _ in range(5):
        await asyncio.sleep(0)
    assert order == ["first in", "other key in"]
    release_first.set()
    await asyncio.gather(*tasks)
    assert order == ["first in", "other key in", "first out", "second in"]
    assert locks._locks == {}


async def test_no_lock_is_left_behind_after_an_error_or_a_cancelled_wait() -> None:
    locks = KeyedLocks()
    with pytest.raises(RuntimeError, match="inside"):
        async with locks.hold("a"):
            raise RuntimeError("inside")
    assert locks._locks == {}

    holding = asyncio.Event()
    release = asyncio.Event()

    async def holder() -> None:
        async with locks.hold("a"):
            holding.set()
            await release.wait()

    async def waiter() -> None:
        async with locks.hold("a"):
            raise AssertionError("a cancelled waiter must never get the lock")

    held = asyncio.create_task(holder())
    await holding.wait()
    waiting = asyncio.create_task(waiter())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    release.set()
    await held
    assert locks._locks == {}
    async with locks.hold("a"):  # and the key is free
        pass
    assert locks._locks == {}
