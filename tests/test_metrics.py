"""GET /metrics: Prometheus text that counts what really happened, read back with its parser."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support import MARTA, Harness, agent_fragment, until

from service.brevo.sandbox import Fault
from service.metrics import _Counts, _Latencies
from service.rpc.generated.handoff.v1 import handoff_pb2 as pb

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(harness: Harness) -> Samples:
    response = await harness.http.get(f"{harness.running.http.base_url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


async def test_metrics_count_a_webhook_a_relayed_message_each_way_and_a_stream(
    harness: Harness,
) -> None:
    handoff = await harness.start_handoff("conv-metrics")
    await harness.settle()
    call = harness.stub.StreamAgentReplies(pb.StreamAgentRepliesRequest(handoff_id=handoff.id))
    reading = asyncio.create_task(call.read())
    await until(lambda: harness.running.manager.open_streams == 1, 5, "the stream is open")
    before = await scrape(harness)
    assert value(before, "handoff_open_streams") == 1

    # Brevo: one 500, then the retry succeeds.
    harness.sandbox.inject_faults(Fault(status=500))
    await harness.stub.SendMessage(
        pb.SendMessageRequest(handoff_id=handoff.id, client_message_id="m-1", text="hello")
    )
    chat = (await harness.stub.GetHandoff(pb.GetHandoffRequest(handoff_id=handoff.id))).handoff
    fragment = agent_fragment(
        handoff.visitor_id, "agent-msg-1", "Hi, Marta here", 0, chat.brevo_conversation_id
    )
    assert (await harness.post(fragment)).json() == {"outcome": "stored", "events": 2}
    assert (await harness.post(fragment)).json()["outcome"] == "duplicate"
    assert (await harness.post(fragment, token="x" * 32)).status_code == 404
    assert (await harness.post(b"{not json")).status_code == 400
    first = await asyncio.wait_for(reading, 5)
    second = await asyncio.wait_for(call.read(), 5)
    assert isinstance(first, pb.StreamAgentRepliesResponse)
    assert isinstance(second, pb.StreamAgentRepliesResponse)
    assert first.event.agent_joined.agent.id == MARTA
    assert second.event.agent_message.brevo_message_id == "agent-msg-1"
    await harness.settle()
    after = await scrape(harness)

    def counted(name: str, **labels: str) -> float:
        return delta(before, after, name, **labels)

    webhooks = "handoff_webhooks_total"
    fragments = "conversationFragment"
    # The agent's fragment, and the sandbox's echo of the service's own post (stored as
    # seen, with no event); the test's second post of the fragment is a duplicate.
    assert counted(webhooks, event=fragments, outcome="stored") == 2
    assert counted(webhooks, event=fragments, outcome="duplicate") == 1
    assert counted(webhooks, event="none", outcome="unauthorized") == 1
    assert counted(webhooks, event="none", outcome="invalid") == 1
    assert counted("handoff_messages_relayed_total", direction="to_agent") == 1
    assert counted("handoff_messages_relayed_total", direction="to_user") == 1
    delivered = "handoff_stream_events_delivered_total"
    assert counted(delivered, type="agent_joined") == 1
    assert counted(delivered, type="agent_message") == 1
    endpoint = "POST /conversations/messages"
    assert counted("handoff_brevo_requests_total", endpoint=endpoint, outcome="500") == 1
    assert counted("handoff_brevo_requests_total", endpoint=endpoint, outcome="200") == 1
    assert counted("handoff_brevo_request_duration_seconds_count", endpoint=endpoint) == 2
    # Both events left on the live stream: two observations, each well under a minute.
    assert counted("handoff_webhook_to_stream_seconds_count") == 2
    assert 0 < counted("handoff_webhook_to_stream_seconds_sum") < 60
    assert value(after, "handoff_webhook_to_stream_seconds_bucket", le="+Inf") >= 2
    assert value(after, "process_resident_memory_bytes") > 0
    call.cancel()
    await until(lambda: harness.running.manager.open_streams == 0, 5, "the stream is closed")
    assert value(await scrape(harness), "handoff_open_streams") == 0


async def test_replayed_events_are_counted_but_not_timed(harness: Harness) -> None:
    handoff = await harness.start_handoff("conv-replay")
    fragment = agent_fragment(handoff.visitor_id, "agent-msg-2", "stored before the stream")
    assert (await harness.post(fragment)).json()["outcome"] == "stored"
    before = await scrape(harness)
    events = await harness.collect(handoff.id, 2)  # both replayed from the store
    assert [e.WhichOneof("payload") for e in events] == ["agent_joined", "agent_message"]
    after = await scrape(harness)
    assert delta(before, after, "handoff_stream_events_delivered_total", type="agent_message") == 1
    assert delta(before, after, "handoff_webhook_to_stream_seconds_count") == 0


def test_the_latency_histogram_puts_each_observation_in_its_bucket_as_prometheus_does() -> None:
    registry = CollectorRegistry()
    latencies = _Latencies("waits_seconds", "Waits.", (0.001, 0.01, 1.0))
    registry.register(latencies)
    for seconds in (0.001, 0.0011, 0.5, 1.0, 7.5):  # a bound itself goes in its own bucket
        latencies.observe(seconds)
    text = generate_latest(registry).decode()
    samples = {
        (sample.name, sample.labels.get("le", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples == {
        ("waits_seconds_bucket", "0.001"): 1,
        ("waits_seconds_bucket", "0.01"): 2,
        ("waits_seconds_bucket", "1.0"): 4,
        ("waits_seconds_bucket", "+Inf"): 5,
        ("waits_seconds_count", ""): 5,
        ("waits_seconds_sum", ""): 0.001 + 0.0011 + 0.5 + 1.0 + 7.5,
    }


def test_plain_counts_are_exposed_as_a_labelled_counter() -> None:
    registry = CollectorRegistry()
    counts = _Counts("things", "Things, by kind and colour.", ["kind", "colour"])
    registry.register(counts)
    counts.inc(("ball", "red"))
    counts.inc(("ball", "red"))
    counts.inc(("cube", "blue"))
    text = generate_latest(registry).decode()
    assert "# TYPE things_total counter" in text
    assert {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    } == {
        ("things_total", (("colour", "red"), ("kind", "ball"))): 2,
        ("things_total", (("colour", "blue"), ("kind", "cube"))): 1,
    }
