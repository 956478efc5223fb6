"""Leases in Redis: one holder per key across every replica (the ``Locks`` port).

A holder owns ``p:lock:<key>`` (SET NX PX with a random token) and renews it while it
holds it, so a replica that dies mid-call frees the key within ``lease_s``. Release and
renewal check the token, so a holder never frees a lease that has passed to another.
Waiters in this process queue on a local lock first, so only one of them polls Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
from collections.abc import AsyncIterator, Awaitable
from typing import Protocol, TypeVar

import redis.asyncio as aioredis

from service.core.errors import ConcurrentUpdate, StoreUnavailable
from service.core.locks import KeyedLocks
from service.storage import redis_scripts

log = logging.getLogger(__name__)

T = TypeVar("T")


class Caller(Protocol):
    """Runs one Redis command, turning Redis errors into StoreUnavailable (the store's own)."""

    async def __call__(self, what: str, op: Awaitable[T], /) -> T: ...


class RedisLocks:
    def __init__(
        self,
        client: aioredis.Redis,
        prefix: str,
        call: Caller,
        lease_s: float = 10.0,
        wait_s: float = 30.0,
    ) -> None:
        self._redis = client
        self._prefix = prefix
        self._call = call
        self._lease_ms = int(lease_s * 1000)
        self._wait_s = wait_s
        self._local = KeyedLocks()
        self._renew = client.register_script(redis_scripts.RENEW_LOCK)
        self._release = client.register_script(redis_scripts.RELEASE_LOCK)

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        async with self._local.hold(key):
            name = f"{self._prefix}:lock:{key}"
            token = secrets.token_hex(16)
            await self._acquire(key, name, token)
            renewing = asyncio.create_task(self._keep(name, token), name=f"lease {key}")
            try:
                yield
            finally:
                renewing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewing
                try:
                    await self._call("release a lease", self._release(keys=[name], args=[token]))
                except StoreUnavailable as exc:
                    log.warning("could not release lease %s (%s); it expires by itself", key, exc)

    async def _acquire(self, key: str, name: str, token: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_s
        delay = 0.005
        while True:
            taken = self._redis.set(name, token, nx=True, px=self._lease_ms)
            if await self._call("take a lease", taken):
                return
            # A resent SET whose first reply was lost finds our own token.
            if await self._call("read a lease", self._redis.get(name)) == token:
                return
            if loop.time() >= deadline:
                raise ConcurrentUpdate(
                    f"{key} stayed busy on another replica for {self._wait_s:g} s; retry"
                )
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.1)

    async def _keep(self, name: str, token: str) -> None:
        while True:
            await asyncio.sleep(self._lease_ms / 3000)
            try:
                renewed = await self._call(
                    "renew a lease", self._renew(keys=[name], args=[token, self._lease_ms])
                )
            except StoreUnavailable as exc:
                log.warning("could not renew lease %s (%s); will try again", name, exc)
                continue
            if not renewed:
                log.warning("lease %s expired while held; another replica may now hold it", name)
                return
