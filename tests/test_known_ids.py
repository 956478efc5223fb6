"""A handoff's message ids as fingerprints (service/storage/known_ids.py), and the SQLite
store confirming every fingerprint that matches, so that a collision never drops a message."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import sample_handoff

from service.core.models import Commit
from service.storage import known_ids
from service.storage.known_ids import KnownIds
from service.storage.sqlite import SqliteStore


def test_ids_added_or_loaded_are_candidates_and_every_other_id_is_new() -> None:
    ids = KnownIds(seen=["a", "b", "a"], sent=["s"])
    assert len(ids) == 3  # a repeated id is held once
    assert ids.candidates(["a", "x", "s", "b", "a"]) == (["a", "b"], ["s"])
    assert ids.candidates(["x", "y"]) == ([], [])
    ids.add(["c", "x" * 500], ["t", "s"])
    assert len(ids) == 6
    assert ids.candidates(["c", "t", "x" * 500, "d"]) == (["c", "x" * 500], ["t"])
    # An id can be both (a sent message that came back and was handled): listed in both.
    ids.add(["s"], [])
    assert ids.candidates(["s"]) == (["s"], ["s"])
    assert KnownIds().candidates(["a"]) == ([], [])


def test_thousands_of_ids_stay_sorted_whatever_the_order_they_come_in() -> None:
    ids = KnownIds(seen=[f"loaded-{n}" for n in range(0, 4000, 2)])
    ids.add([f"loaded-{n}" for n in range(3999, 0, -2)], [])
    assert len(ids) == 4000
    everything = [f"loaded-{n}" for n in range(4000)]
    assert ids.candidates(everything) == (everything, [])
    assert ids.candidates([f"other-{n}" for n in range(4000)]) == ([], [])


async def test_a_fingerprint_that_collides_is_confirmed_with_the_file_and_drops_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every id gets the same fingerprint: each lookup of a cached handoff is a collision.
    monkeypatch.setattr(known_ids, "hash", lambda _: 7, raising=False)
    store = await SqliteStore.open(str(tmp_path / "collide.db"))
    try:
        h, _ = await store.create_handoff(sample_handoff(1))
        assert (await store.read_for_webhook(h.id, ["m1"]))[1:] == (set(), set())  # loads
        await store.commit(Commit(h, 0, seen_message_ids=("m1",), sent_message_ids=("s1",)))
        read = await store.read_for_webhook(h.id, ["m1", "m2", "s1", "s2"])
        assert read.handoff is not None
        assert (read.seen, read.sent) == ({"m1"}, {"s1"})
    finally:
        await store.close()
