"""Prometheus metrics served at ``GET /metrics``: the one module that knows prometheus_client.

Each running service has its own registry (tests run several in one process). The core
knows nothing of this: its counters (``HandoffManager.stats``) and open-stream count are
read at scrape time, and the adapters report what only they see (webhook outcomes, Brevo
calls, events leaving on streams).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterable, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from service.core.brevo_payloads import KNOWN_EVENTS
from service.core.handoffs import HandoffManager
from service.core.models import StoredEvent

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

# Loopback deliveries take about a millisecond; a slow store or a backlog takes seconds.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class _ManagerCounters(Collector):
    """The core's own counters, read when Prometheus scrapes."""

    def __init__(self, manager: HandoffManager) -> None:
        self._manager = manager

    def collect(self) -> Iterable[CounterMetricFamily]:
        stats = self._manager.stats
        relayed = CounterMetricFamily(
            "handoff_messages_relayed",
            "Messages relayed: to_agent = SendMessage posted to Brevo, to_user = agent "
            "messages stored for the reply streams.",
            labels=["direction"],
        )
        relayed.add_metric(["to_agent"], stats["messages_to_agent"])
        relayed.add_metric(["to_user"], stats["messages_from_agent"])
        yield relayed
        dropped = CounterMetricFamily(
            "handoff_messages_dropped",
            "Messages in webhooks that were not relayed, by reason (duplicate, echo of the "
            "service's own post, handoff already ended, ...).",
            labels=["reason"],
        )
        prefix = "messages_dropped_"
        for key, count in sorted(stats.items()):
            if key.startswith(prefix):
                dropped.add_metric([key[len(prefix) :]], count)
        yield dropped

    def describe(self) -> Iterable[CounterMetricFamily]:
        return []


class _Counts(Collector):
    """A counter by labels whose children are plain integers, for what is counted on every
    webhook or stream event. A labelled ``Counter``'s increment takes its lock and a few
    calls: about a microsecond of a webhook's CPU (``make micro``'s route, 2026-12-03).
    Counted and read on the event loop only (``/metrics`` is served there), so no lock."""

    def __init__(self, name: str, documentation: str, labels: list[str]) -> None:
        self._name = name
        self._documentation = documentation
        self._labels = labels
        self.counts: dict[tuple[str, ...], int] = {}

    def inc(self, key: tuple[str, ...]) -> None:
        self.counts[key] = self.counts.get(key, 0) + 1

    def collect(self) -> Iterable[CounterMetricFamily]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labels)
        for key, count in sorted(self.counts.items()):
            family.add_metric(list(key), count)
        yield family

    def describe(self) -> Iterable[CounterMetricFamily]:
        return []


class _Latencies(Collector):
    """A histogram of seconds as plain integers per bucket, for what is observed on every
    stream event; on the event loop only, like ``_Counts`` (a ``Histogram``'s observation
    takes a lock for its bucket and another for its sum)."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = list(buckets)
        self._counts = [0] * (len(self._bounds) + 1)  # the last: above every bound
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, seconds)] += 1
        self._sum += seconds

    def collect(self) -> Iterable[HistogramMetricFamily]:
        cumulative: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip(
            [*map(floatToGoString, self._bounds), "+Inf"], self._counts, strict=True
        ):
            total += count
            cumulative.append((bound, total))
        yield HistogramMetricFamily(
            self._name, self._documentation, buckets=cumulative, sum_value=self._sum
        )

    def describe(self) -> Iterable[HistogramMetricFamily]:
        return []


class Metrics:
    """Made before the manager (which reports deliveries to it), then ``watch``-es it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        # (event, outcome): both come from fixed sets, so the counts stay few.
        self._webhooks = _Counts(
            "handoff_webhooks",
            "Brevo webhooks received, by event and outcome (stored, duplicate, forbidden_source, "
            "unknown_visitor, ignored_event, invalid, too_large, unauthorized, unavailable, "
            "error).",
            ["event", "outcome"],
        )
        self.registry.register(self._webhooks)
        self._delivered_types: dict[type, tuple[str]] = {}
        self._brevo_children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self._open_streams = Gauge(
            "handoff_open_streams",
            "StreamAgentReplies calls open on this replica.",
            registry=self.registry,
        )
        self._delivered = _Counts(
            "handoff_stream_events_delivered", "Events sent on reply streams, by type.", ["type"]
        )
        self.registry.register(self._delivered)
        self._brevo_requests = Counter(
            "handoff_brevo_requests",
            "Brevo API calls (each attempt), by endpoint and outcome: the HTTP status, or "
            "timeout / connection_error.",
            ["endpoint", "outcome"],
            registry=self.registry,
        )
        self._brevo_seconds = Histogram(
            "handoff_brevo_request_duration_seconds",
            "How long each Brevo API attempt took.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._webhook_to_stream = _Latencies(
            "handoff_webhook_to_stream_seconds",
            "From a webhook's arrival (on any replica) to its event leaving on a live stream "
            "of this replica (replayed events are not counted: their wait is the reader's).",
            LATENCY_BUCKETS,
        )
        self.registry.register(self._webhook_to_stream)

    def watch(self, manager: HandoffManager) -> None:
        """Exports the manager's counters and open streams."""
        self.registry.register(_ManagerCounters(manager))
        self._open_streams.set_function(lambda: manager.open_streams)

    def webhook(self, event_name: str, outcome: str) -> None:
        event = event_name if event_name in KNOWN_EVENTS else ("other" if event_name else "none")
        self._webhooks.inc((event, outcome))

    def brevo_call(self, endpoint: str, outcome: str, seconds: float) -> None:
        # The endpoints and outcomes are the client's own few strings: each child is kept.
        children = self._brevo_children.get((endpoint, outcome))
        if children is None:
            children = self._brevo_children[(endpoint, outcome)] = (
                self._brevo_requests.labels(endpoint, outcome),
                self._brevo_seconds.labels(endpoint),
            )
        children[0].inc()
        children[1].observe(seconds)

    def event_delivered(self, event: StoredEvent, live: bool) -> None:
        kind = type(event.payload)
        key = self._delivered_types.get(kind)
        if key is None:  # one per payload type
            key = self._delivered_types[kind] = (_event_type(event),)
        self._delivered.inc(key)
        if live and event.received_at_ms > 0:
            waited_s = (time.time_ns() // 1_000_000 - event.received_at_ms) / 1000
            self._webhook_to_stream.observe(max(waited_s, 0.0))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _event_type(event: StoredEvent) -> str:
    name = type(event.payload).__name__
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")
