"""``python -m bench.micro``, the in-process measures of a webhook's own work, on small
sizes: its figures mean nothing here; what is checked is that each part ran."""

from __future__ import annotations

import pytest

from bench import micro
from bench.micro import figures, webhook_cpu_us
from service.core.ports import HandoffStore
from service.storage import sqlite


def test_the_micro_benchmark_reports_each_hot_path() -> None:
    costs = figures(calls=20)
    assert set(costs) == {
        "frozen dataclass, 12 fields",
        "@immutable class, 12 fields",
        "orjson.loads (a fragment)",
        "parse_webhook (a fragment)",
        "plan_inbound (one agent reply)",
        "Handoff.at_version",
        "dataclasses.replace(Handoff)",
        "stream item, built apart",
        "stream item, in place (reply_out)",
    }
    assert all(0 < us < 10_000 for us in costs.values()), costs


async def test_the_micro_benchmark_drives_the_webhook_route_in_process() -> None:
    cpu_us, statuses = await webhook_cpu_us(webhooks=300)
    assert statuses == {200: 300}  # every fragment answered, the warm-up's too
    assert 0 < cpu_us < 100_000


async def test_the_micro_benchmark_drives_the_route_over_the_id_budget_and_restores_it() -> None:
    budget = sqlite.IDS_CACHED
    cpu_us, statuses = await webhook_cpu_us(webhooks=300, ids_cached=50)
    assert statuses == {200: 300}
    assert 0 < cpu_us < 100_000
    assert budget == sqlite.IDS_CACHED  # the service's own budget again


async def test_the_micro_benchmark_seeds_the_ids_it_says_before_the_route_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seeded: list[tuple[int, int]] = []  # (seeded ids in the file, of which cached)
    original = micro._seed_ids

    async def seed_and_count(store: HandoffStore, handoff_ids: list[str], count: int) -> None:
        await original(store, handoff_ids, count)
        assert isinstance(store, sqlite.SqliteStore)
        rows = store._db().execute(
            "SELECT handoff_id, message_id FROM seen_messages WHERE message_id LIKE 'seeded-%'"
        )
        in_file = list(rows)
        cached = 0
        for handoff_id, message_id in in_file:
            ids = store._ids.get(handoff_id)
            cached += ids is not None and ids.candidates([message_id]) == ([message_id], [])
        seeded.append((len(in_file), cached))

    monkeypatch.setattr(micro, "_seed_ids", seed_and_count)
    cpu_us, statuses = await webhook_cpu_us(webhooks=300, seeded_ids=micro.HANDOFFS * 40)
    assert statuses == {200: 300}
    assert 0 < cpu_us < 100_000
    assert seeded == [(micro.HANDOFFS * 40, micro.HANDOFFS * 40)]  # all stored, all cached
