"""Prometheus metrics served at ``GET /metrics``: the one module that knows prometheus_client.

Each running service has its own registry (tests run several in one process). The core
knows nothing of this: its counters (``HandoffManager.stats``) and open-stream count are
read at scrape time, and the adapters report what only they see (webhook outcomes, Brevo
calls, events leaving on streams).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

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


class Metrics:
    """Made before the manager (which reports deliveries to it), then ``watch``-es it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self._webhooks = Counter(
            "handoff_webhooks",
            "Brevo webhooks received, by event and outcome (stored, duplicate, forbidden_source, "
            "unknown_visitor, ignored_event, invalid, too_large, unauthorized, unavailable, "
            "error).",
            ["event", "outcome"],
            registry=self.registry,
        )
        # (event, outcome) -> its child: both come from fixed sets, so this stays small.
        self._webhook_counters: dict[tuple[str, str], Counter] = {}
        self._delivered_counters: dict[type, Counter] = {}
        self._brevo_children: dict[tuple[str, str], tuple[Counter, Histogram]] = {}
        self._open_streams = Gauge(
            "handoff_open_streams",
            "StreamAgentReplies calls open on this replica.",
            registry=self.registry,
        )
        self._delivered = Counter(
            "handoff_stream_events_delivered",
            "Events sent on reply streams, by type.",
            ["type"],
            registry=self.registry,
        )
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
        self._webhook_to_stream = Histogram(
            "handoff_webhook_to_stream_seconds",
            "From a webhook's arrival (on any replica) to its event leaving on a live stream "
            "of this replica (replayed events are not counted: their wait is the reader's).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def watch(self, manager: HandoffManager) -> None:
        """Exports the manager's counters and open streams."""
        self.registry.register(_ManagerCounters(manager))
        self._open_streams.set_function(lambda: manager.open_streams)

    def webhook(self, event_name: str, outcome: str) -> None:
        event = event_name if event_name in KNOWN_EVENTS else ("other" if event_name else "none")
        counter = self._webhook_counters.get((event, outcome))
        if counter is None:  # labels() costs more than the increment: each child is kept
            counter = self._webhook_counters[(event, outcome)] = self._webhooks.labels(
                event, outcome
            )
        counter.inc()

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
        counter = self._delivered_counters.get(kind)
        if counter is None:  # one per payload type
            counter = self._delivered_counters[kind] = self._delivered.labels(_event_type(event))
        counter.inc()
        if live and event.received_at_ms > 0:
            waited_s = (time.time_ns() // 1_000_000 - event.received_at_ms) / 1000
            self._webhook_to_stream.observe(max(waited_s, 0.0))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _event_type(event: StoredEvent) -> str:
    name = type(event.payload).__name__
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")
