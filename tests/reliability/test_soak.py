"""Soak: 1,000 open reply streams and steady webhook traffic for 60 seconds.

The service runs in this process (gRPC, gateway, SQLite, sandbox, on loopback ports). The
1,000 streams run in a process of their own (soak_client.py: 10 gRPC channels, each on a
TCP connection of its own, 100 streams on each), so that the streams' client side is not
counted in the service's memory: 50 handoffs, 20 streams on each. For SOAK_SECONDS the test
posts conversationFragment webhooks at a steady 20 a second, round-robin over the handoffs,
with 1 to 3 agent messages each; then it stops every handoff, which ends every stream with
HandoffEnded.

What is measured in this process, where the service runs: its resident memory (sampled
every 5 s, after garbage collection and malloc_trim), its open file descriptors, its asyncio
tasks and the service's count of open streams, before the streams open and after they have
all ended. The bound on memory: from the sample 10 s into the soak to the highest sample
after it, the RSS grows by less than 10 MiB (RSS_GROWTH_BOUND). Descriptors and tasks must
be back to exactly their number before.

The RSS once the streams have ended is recorded, not bounded: it stays about 15 MiB above
the figure before they opened. That is a high-water mark, not a leak: opening and closing
another 1,000 streams on the same service, three times over, left it within half a MiB of
where it was each time (checked by hand; not part of this test).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from client_process import ClientProcess
from log_audit import AUDIT
from reliability_support import record_figures, rss_bytes, watch_error_logs
from support import (
    MARTA,
    Harness,
    agent_fragment,
    close_harness,
    make_config,
    open_harness,
    until,
)

from service.rpc.generated.handoff.v1 import handoff_pb2 as pb

SOAK_SECONDS = int(os.environ.get("SOAK_SECONDS", "60"))  # shorter for a quick local run
HANDOFFS = 50
STREAMS_PER_HANDOFF = 20
STREAMS = HANDOFFS * STREAMS_PER_HANDOFF  # 1,000
CHANNELS = 10  # gRPC channels (TCP connections) the streams are spread over
WEBHOOKS_PER_SECOND = 20
MESSAGES_PER_WEBHOOK = (1, 2, 3)  # agent messages in webhook k: 1 + k % 3
HEARTBEAT_S = 2  # --heartbeat-seconds: a handoff gets a webhook every 2.5 s, so idle
# stretches of its streams get heartbeats too
SAMPLE_EVERY_S = 5  # RSS sample interval during the soak
WARM_UP_S = 10  # the RSS sample the growth is measured from (the start, on a shorter soak)
# The most the RSS may grow after warm-up. What does grow, slowly, over a soak: the lines
# the session's log audit keeps (3 a webhook, about 1 MiB a minute, reported), SQLite's
# page cache as the event log grows (at most its 2 MiB cache; the database's size is
# reported), and the test's own lists of what it sent.
RSS_GROWTH_BOUND = 10 * 1024 * 1024
MAX_SCHEDULE_LAG_S = 5.0  # no webhook may go out later than this behind its schedule
SETTLE_S = 10.0  # how long ended streams may take to be released
SOAK_CLIENT = Path(__file__).with_name("soak_client.py")


@pytest.fixture
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = await open_harness(make_config(tmp_path, "--heartbeat-seconds", str(HEARTBEAT_S)))
    try:
        yield harness
    finally:
        await close_harness(harness)


@contextmanager
def pytest_log_capture_at_warning() -> Iterator[None]:
    """pytest's own capture of the test's log (its handlers on the root logger) keeps only
    WARNING and above meanwhile.

    At DEBUG pytest keeps every LogRecord the test process logs (caplog's records, about
    1 KiB each with their arguments) and the captured text, as UCS-4 in a StringIO, for the
    report: the service logs three records per webhook, and over the soak pytest alone would
    add about 6 MiB to the process, growing with time. That memory is pytest's, not the
    service's. The root logger stays at DEBUG: the service still formats every record and
    the session's log audit (conftest.py) still keeps a line per record, which is counted
    (``log_audit_mib_kept_during_soak``).
    """
    handlers = [
        handler
        for handler in logging.getLogger().handlers
        if type(handler).__module__.startswith("_pytest.")
    ]
    levels = [handler.level for handler in handlers]
    for handler in handlers:
        handler.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for handler, level in zip(handlers, levels, strict=True):
            handler.setLevel(level)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def fd_kinds() -> Counter[str]:
    """Open file descriptors by kind (socket, pipe, anon_inode:[eventfd], a file's path),
    to say what leaked when the count differs."""
    kinds: Counter[str] = Counter()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue  # the descriptor of the listing itself, closed by now
        kinds[re.sub(r"\[\d+\]$", "", target)] += 1
    return kinds


def file_size(path: str) -> int:
    return Path(path).stat().st_size


def task_count() -> int:
    return len(asyncio.all_tasks())


def task_kinds() -> Counter[str]:
    return Counter(
        getattr(task.get_coro(), "__qualname__", repr(task)) for task in asyncio.all_tasks()
    )


async def steady(measure: Callable[[], int]) -> int:
    """``measure()`` once it reads the same twice in a row 0.25 s apart (work that a
    previous answer left, such as a connection's request task finishing, has ended)."""
    last = measure()
    for _ in range(40):
        await asyncio.sleep(0.25)
        now = measure()
        if now == last:
            return now
        last = now
    raise AssertionError(f"{measure.__name__} never steadied: {last}")


async def refresh_connection_pools(h: Harness, conversation_id: str) -> None:
    """Uses the service's pooled HTTP connections: one to the sandbox (the Brevo client's)
    and one to the gateway (the sandbox's webhook deliveries), both kept alive.

    The servers at their other end close a connection idle for 5 s (uvicorn's keep-alive),
    and the pool keeps its end until its next request: whether the pair counts 2, 1 or 0
    descriptors depends on how long ago the last Brevo call was. A new handoff posts its
    opening message (one Brevo call) and the sandbox delivers its echo (two webhooks), one
    at a time: right after, each pool holds exactly one fresh connection, both ends open,
    whatever state it was in. Done right before each count, it makes the counts comparable.
    """
    await h.start_handoff(conversation_id)
    await h.settle()


def fragment(
    visitor_id: str, chat_id: str, messages: list[tuple[str, str, int]]
) -> dict[str, object]:
    """A conversationFragment from agent Marta with ``(id, text, createdAt offset)``s."""
    body = agent_fragment(visitor_id, "", "", 0, chat_id)
    items: list[object] = []
    for message_id, text, n in messages:
        one = agent_fragment(visitor_id, message_id, text, n, chat_id)["messages"]
        assert isinstance(one, list)
        items.extend(one)
    body["messages"] = items
    return body


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def delivered_total(h: Harness) -> int:
    """Events the service has sent on streams (handoff_stream_events_delivered_total)."""
    return int(
        sum(
            sample.value
            for metric in h.running.metrics.registry.collect()
            if metric.name == "handoff_stream_events_delivered"
            for sample in metric.samples
            if sample.name.endswith("_total")
        )
    )


def webhook_to_stream(h: Harness) -> tuple[float, float]:
    """The mean of handoff_webhook_to_stream_seconds, and the upper bound of the bucket
    its 99th percentile falls in."""
    buckets: list[tuple[float, float]] = []
    total = count = 0.0
    for metric in h.running.metrics.registry.collect():
        if metric.name != "handoff_webhook_to_stream_seconds":
            continue
        for sample in metric.samples:
            if sample.name.endswith("_bucket"):
                buckets.append((float(sample.labels["le"]), sample.value))
            elif sample.name.endswith("_sum"):
                total = sample.value
            elif sample.name.endswith("_count"):
                count = sample.value
    assert count > 0, "no live delivery was measured"
    p99 = next(le for le, cumulative in sorted(buckets) if cumulative >= 0.99 * count)
    return total / count, p99


@pytest.mark.timeout(300)  # about 70 s; the project's default per test is 120 s
async def test_a_thousand_streams_under_steady_webhooks_leak_nothing(
    h: Harness,
    request: pytest.FixtureRequest,
    record_property: Callable[[str, object], None],
) -> None:
    """For SOAK_SECONDS (60) 1,000 streams stay open while webhooks arrive at 20 a second:
    every webhook is answered 200 stored; every stream receives every agent message of its
    handoff exactly once and in order, after AgentJoined, and ends with HandoffEnded; the
    service's RSS grows by less than RSS_GROWTH_BOUND from warm-up to the end; once the
    streams have ended, the service's file descriptors, asyncio tasks and open streams are
    back to exactly what they were before the streams opened; no error was logged."""
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    with watch_error_logs() as error_logs, pytest_log_capture_at_warning():
        handoffs = [await h.start_handoff(f"soak-{i}") for i in range(HANDOFFS)]
        await h.settle()  # the echoes of the opening messages name Brevo's chats
        chats = [
            (await h.stub.GetHandoff(pb.GetHandoffRequest(handoff_id=x.id))).handoff
            for x in handoffs
        ]
        assert all(chat.brevo_conversation_id for chat in chats)
        assert h.running.manager.open_streams == 0

        # Before the streams: the test's gRPC channel and the pooled HTTP connections of the
        # service and the sandbox are open (and will be again at the count after); the
        # webhook poster comes later and is closed before that count.
        await refresh_connection_pools(h, "probe-before")
        fds_before, fd_kinds_before = await steady(open_fds), fd_kinds()
        tasks_before, task_kinds_before = await steady(task_count), task_kinds()
        rss_before = rss_bytes()

        expected: list[list[str]] = [[] for _ in range(HANDOFFS)]
        latencies: list[float] = []
        agent_messages = 0
        async with httpx.AsyncClient(timeout=10) as poster:

            async def post(i: int, messages: list[tuple[str, str, int]]) -> None:
                nonlocal agent_messages
                chat = chats[i]
                body = fragment(chat.visitor_id, chat.brevo_conversation_id, messages)
                sent_at = time.monotonic()
                answer = await poster.post(h.webhook_url, json=body)
                latencies.append(time.monotonic() - sent_at)
                joined = 0 if expected[i] else 1
                assert answer.status_code == 200, answer.text
                assert answer.json() == {"outcome": "stored", "events": len(messages) + joined}
                if joined:
                    expected[i].append(f"joined {MARTA}")
                expected[i] += [f"{message_id} {text}" for message_id, text, _ in messages]
                agent_messages += len(messages)

            # Every handoff gets its agent before the streams open: each stream's first
            # event is then AgentJoined, replayed after the service subscribed the stream.
            for i in range(HANDOFFS):
                await post(i, [(f"first-{i}", f"hello from handoff {i}", 0)])

            client = await ClientProcess.start(
                SOAK_CLIENT,
                h.running.grpc_target,
                str(CHANNELS),
                str(STREAMS_PER_HANDOFF),
                str(SOAK_SECONDS + 180),
                *(x.id for x in handoffs),
            )
            try:
                ready = await client.answer(90)
                assert ready["ready"] == STREAMS, ready
                assert ready["failed"] == 0, ready
                assert h.running.manager.open_streams == STREAMS
                rss_open = rss_bytes()

                # The soak: webhook k at t0 + k / 20 s, to handoff k % 50, with 1 + k % 3
                # messages; createdAt increases with k.
                total = SOAK_SECONDS * WEBHOOKS_PER_SECOND
                t0 = loop.time()
                audit_lines_at_start = len(AUDIT.lines)
                worst_lag = 0.0

                async def traffic() -> None:
                    nonlocal worst_lag
                    for k in range(total):
                        wait = t0 + k / WEBHOOKS_PER_SECOND - loop.time()
                        if wait > 0:
                            await asyncio.sleep(wait)
                        worst_lag = max(worst_lag, -wait)
                        count = MESSAGES_PER_WEBHOOK[k % len(MESSAGES_PER_WEBHOOK)]
                        await post(
                            k % HANDOFFS,
                            [(f"s{k}-{m}", f"reply {k}.{m}", 1 + 3 * k + m) for m in range(count)],
                        )

                samples: list[tuple[float, int]] = []

                async def sample_rss() -> None:
                    for j in range(SOAK_SECONDS // SAMPLE_EVERY_S + 1):
                        await asyncio.sleep(max(0.0, t0 + j * SAMPLE_EVERY_S - loop.time()))
                        samples.append((loop.time() - t0, rss_bytes()))

                await asyncio.gather(traffic(), sample_rss())
                soak_s = loop.time() - t0
                rss_end = rss_bytes()
                samples.append((soak_s, rss_end))
                # The session's log audit (conftest.py) keeps every log line of this process:
                # part of the growth is the test's, not the service's.
                audit_added = AUDIT.lines[audit_lines_at_start:]
                audit_bytes = sum(sys.getsizeof(e) + sys.getsizeof(e[1]) for e in audit_added)
                assert h.running.manager.open_streams == STREAMS

                # Every handoff ends: each of its streams gets HandoffEnded and completes.
                for x in handoffs:
                    stopped = await h.stub.StopHandoff(pb.StopHandoffRequest(handoff_id=x.id))
                    assert stopped.handoff.state == pb.HANDOFF_STATE_ENDED
                for handoff_events in expected:
                    handoff_events.append("ended END_REASON_STOPPED_BY_BOT")
                reports = [await client.answer(60) for _ in range(STREAMS)]
                done = await client.answer(30)
            finally:
                exit_code = await client.close()
        assert exit_code == 0
        assert done["done"] == STREAMS

        # Every stream: every event of its handoff, exactly once, in order.
        wrong: list[str] = []
        digests: dict[str, set[str]] = {}
        for n, report in enumerate(reports):
            assert report["stream"] == n
            i = n // STREAMS_PER_HANDOFF
            assert report["handoff"] == handoffs[i].id
            events: list[str] = report["events"]
            if report["code"] != "OK" or events != expected[i]:
                first_difference = next(
                    (
                        j
                        for j, (a, b) in enumerate(zip(events, expected[i], strict=False))
                        if a != b
                    ),
                    min(len(events), len(expected[i])),
                )
                wrong.append(
                    f"stream {n} ({report['code']} {report['details']!r}): "
                    f"{len(events)} events for {len(expected[i])} expected, first "
                    f"difference at {first_difference}: {events[first_difference:][:3]} "
                    f"instead of {expected[i][first_difference:][:3]}"
                )
            assert report["cursors"] == len(events), f"stream {n}: a cursor came twice"
            digests.setdefault(report["handoff"], set()).add(report["cursor_digest"])
        assert not wrong, f"{len(wrong)} of {STREAMS} streams wrong; " + "; ".join(wrong[:5])
        # The streams of one handoff saw the very same cursors.
        assert all(len(d) == 1 for d in digests.values())
        received = sum(len(report["events"]) for report in reports)
        assert delivered_total(h) == received
        heartbeats = sum(int(report["heartbeats"]) for report in reports)

        # After: the streams' connections and tasks are gone, nothing else is left.
        # The client process has exited: its connections are closed at the kernel, and the
        # service's ends close as soon as gRPC reads their end of file.
        await until(lambda: h.running.manager.open_streams == 0, SETTLE_S, "streams ended")
        await steady(open_fds)
        await steady(task_count)
        await refresh_connection_pools(h, "probe-after")
        fds_after, fd_kinds_after = await steady(open_fds), fd_kinds()
        tasks_after, task_kinds_after = await steady(task_count), task_kinds()
        rss_after = rss_bytes()
        database_bytes = file_size(h.running.config.sqlite_path)
        assert not error_logs.records, error_logs.describe()

    # Growth: from the sample at the end of warm-up (the first, on a soak that short) to
    # the highest sample from then on.
    warm_at = WARM_UP_S if SOAK_SECONDS > WARM_UP_S else 0
    after_warm_up = [rss for at, rss in samples if at >= warm_at - 0.5]
    growth = max(after_warm_up) - after_warm_up[0]
    mean_s, p99_le_s = webhook_to_stream(h)
    mib = 2**20
    figures: dict[str, object] = {
        "streams": STREAMS,
        "handoffs": HANDOFFS,
        "grpc_connections": CHANNELS,
        "soak_seconds": SOAK_SECONDS,
        "soak_measured_s": round(soak_s, 2),
        "webhooks_posted": len(latencies),
        "soak_webhooks": total,
        "webhooks_per_second": round(total / soak_s, 2),
        "agent_messages": agent_messages,
        "events_per_stream": [min(map(len, expected)), max(map(len, expected))],
        "events_delivered": received,
        "events_delivered_per_second": round(received / soak_s, 1),
        "heartbeats_delivered": heartbeats,
        "streams_ready_after_s": ready["seconds"],
        "webhook_latency_p50_ms": round(quantile(latencies, 0.5) * 1000, 1),
        "webhook_latency_p99_ms": round(quantile(latencies, 0.99) * 1000, 1),
        "webhook_latency_max_ms": round(max(latencies) * 1000, 1),
        "webhook_to_stream_mean_ms": round(mean_s * 1000, 1),
        "webhook_to_stream_p99_at_most_s": p99_le_s,
        "worst_schedule_lag_s": round(worst_lag, 3),
        "rss_before_streams_mib": round(rss_before / mib, 1),
        "rss_streams_open_mib": round(rss_open / mib, 1),
        "rss_samples_mib": [[round(at, 1), round(rss / mib, 1)] for at, rss in samples],
        "rss_end_of_soak_mib": round(rss_end / mib, 1),
        "rss_after_close_mib": round(rss_after / mib, 1),
        "rss_growth_after_warm_up_mib": round(growth / mib, 2),
        "rss_growth_bound_mib": RSS_GROWTH_BOUND // mib,
        "log_audit_lines_kept_during_soak": len(audit_added),
        "log_audit_mib_kept_during_soak": round(audit_bytes / mib, 2),
        "sqlite_database_mib_at_end": round(database_bytes / mib, 2),
        "fds_before": fds_before,
        "fds_after": fds_after,
        "tasks_before": tasks_before,
        "tasks_after": tasks_after,
        "soak_client_rss_mib": done["rss_mib"],
        "duration_s": round(time.monotonic() - started, 2),
    }
    record_figures(request, record_property, figures)
    assert worst_lag <= MAX_SCHEDULE_LAG_S, figures
    assert fds_after == fds_before, (
        f"descriptors opened: {fd_kinds_after - fd_kinds_before}, "
        f"closed: {fd_kinds_before - fd_kinds_after}"
    )
    assert tasks_after == tasks_before, (
        f"tasks added: {task_kinds_after - task_kinds_before}, "
        f"gone: {task_kinds_before - task_kinds_after}"
    )
    assert growth < RSS_GROWTH_BOUND, figures
