"""Per-key asyncio locks that disappear when nobody holds or waits for them."""

from __future__ import annotations

import asyncio
from types import TracebackType


class _Entry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0  # holding or waiting


class KeyedLocks:
    def __init__(self) -> None:
        self._locks: dict[str, _Entry] = {}

    def hold(self, key: str) -> _Held:
        """``async with locks.hold(key):`` runs alone among holders of ``key``."""
        return _Held(self._locks, key)


class _Held:
    """One use of a key's lock. A plain class rather than ``asynccontextmanager``: it is
    taken around every webhook, and the generator machinery cost more than the lock."""

    __slots__ = ("_entry", "_key", "_locks")

    def __init__(self, locks: dict[str, _Entry], key: str) -> None:
        self._locks = locks
        self._key = key
        self._entry: _Entry | None = None

    async def __aenter__(self) -> None:
        entry = self._locks.get(self._key)
        if entry is None:
            entry = self._locks[self._key] = _Entry()
        entry.users += 1
        try:
            await entry.lock.acquire()
        except BaseException:
            self._leave(entry)
            raise
        self._entry = entry

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        entry, self._entry = self._entry, None
        if entry is not None:
            entry.lock.release()
            self._leave(entry)

    def _leave(self, entry: _Entry) -> None:
        entry.users -= 1
        if entry.users <= 0 and self._locks.get(self._key) is entry:
            del self._locks[self._key]
