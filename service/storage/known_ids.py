"""A handoff's seen and sent message ids in memory, as sorted 64-bit fingerprints.

The SQLite store keeps them beside a cached handoff record, so that a webhook learns without
a statement that its messages are new (the usual case). A fingerprint is the id's ``hash``:
8 bytes an id in an ``array``, where a set of the ids' strings took about 100. Fingerprints
can collide, so a match only says "maybe": the store confirms every match with the file
before it drops a message as a duplicate or an echo (a match is rare: a redelivery, an
echo of the service's own post). No match is certain: the id is new.

``hash`` of a string differs from process to process (PYTHONHASHSEED): fingerprints live
in memory only, and are made again from the ids when a process reads them from the file.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Iterable, Sequence


def _sorted(ids: Iterable[str]) -> array[int]:
    return array("q", sorted({hash(i) for i in ids}))


def _add(fingerprints: array[int], ids: Iterable[str]) -> None:
    for message_id in ids:
        fingerprint = hash(message_id)
        at = bisect_left(fingerprints, fingerprint)
        if at == len(fingerprints) or fingerprints[at] != fingerprint:
            fingerprints.insert(at, fingerprint)


def _has(fingerprints: array[int], fingerprint: int) -> bool:
    at = bisect_left(fingerprints, fingerprint)
    return at < len(fingerprints) and fingerprints[at] == fingerprint


class KnownIds:
    """The fingerprints of a handoff's seen ids and of its sent ids. ``len`` is how many
    fingerprints it holds (the store's budget counts those)."""

    __slots__ = ("_seen", "_sent")

    def __init__(self, seen: Iterable[str] = (), sent: Iterable[str] = ()) -> None:
        self._seen = _sorted(seen)
        self._sent = _sorted(sent)

    def __len__(self) -> int:
        return len(self._seen) + len(self._sent)

    def add(self, seen: Iterable[str], sent: Iterable[str]) -> None:
        _add(self._seen, seen)
        _add(self._sent, sent)

    def candidates(self, ids: Sequence[str]) -> tuple[list[str], list[str]]:
        """Those of ``ids`` that may have been seen, and those that may have been sent
        (each to confirm); every other id is new for certain. Each listed once."""
        maybe_seen: list[str] = []
        maybe_sent: list[str] = []
        seen, sent = self._seen, self._sent
        for message_id in dict.fromkeys(ids) if len(ids) > 1 else ids:
            fingerprint = hash(message_id)
            if seen and _has(seen, fingerprint):
                maybe_seen.append(message_id)
            if sent and _has(sent, fingerprint):
                maybe_sent.append(message_id)
        return maybe_seen, maybe_sent
