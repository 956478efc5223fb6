"""``python -m bench.micro``, the in-process measures of a webhook's own work, on small
sizes: its figures mean nothing here; what is checked is that each part ran."""

from __future__ import annotations

from bench.micro import figures, webhook_cpu_us
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
