"""``python -m bench.micro``: what the webhook's own work costs, in-process.

Two parts: one call of each of the core's hot paths (the best of five runs of ``timeit``;
with a stream's item for an agent message as ``reply_out`` builds it and as it was built
before), and the webhook route as a whole, the gateway's ASGI app called directly by 16 concurrent
callers against a service on a new SQLite file (CPU per webhook; no HTTP server, no
sockets: ``make bench`` measures those with the rest), and the same again with the SQLite
store's message-id budget (IDS_CACHED) set below what its handoffs hold in all, as when more
handoffs take webhooks than the budget keeps the ids of, and with its handoffs holding
SEEDED_IDS ids before the first webhook. The figures the code's comments quote
about a webhook's own work come from here. Like every timing on these machines they move by
a tenth or so between runs: compare figures of one run with each other.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path

import orjson
from google.protobuf.timestamp_pb2 import Timestamp

from bench.scenarios import fragment
from gateway.app import Gateway, create_gateway
from service.app import start_service
from service.config import Config, load_config
from service.core.access import TokenSet
from service.core.brevo_payloads import parse_webhook
from service.core.handoffs import StartRequest
from service.core.immutable import immutable
from service.core.inbound import ServiceIdentity, plan_inbound
from service.core.models import (
    Agent,
    AgentMessage,
    Commit,
    Handoff,
    HandoffState,
    StoredEvent,
)
from service.core.ports import HandoffStore
from service.metrics import Metrics
from service.rpc.convert import reply_out
from service.rpc.generated.handoff.v1 import handoff_pb2 as pb
from service.storage import sqlite

CALLS = 100_000


# A class of twelve fields (BrevoMessage's count), made twice: once a frozen dataclass, once
# @immutable; only how they are built differs.
_FIELDS = {name: str for name in "abcdefghijkl"}


def _twelve_fields(name: str) -> type:
    return type(name, (), {"__annotations__": dict(_FIELDS)})


_Frozen: Callable[..., object] = dataclasses.dataclass(frozen=True, slots=True)(
    _twelve_fields("_Frozen")
)
_Immutable: Callable[..., object] = immutable(_twelve_fields("_Immutable"))


def _item_built_apart(e: StoredEvent) -> pb.StreamAgentRepliesResponse:
    """A stream's item for an agent message as the service built it before ``reply_out``:
    each sub-message built on its own, then copied into the event, the event into the item."""
    assert isinstance(e.payload, AgentMessage)
    when = Timestamp()
    when.FromMilliseconds(e.occurred_at_ms)
    event = pb.HandoffEvent(
        cursor=e.cursor,
        handoff_id=e.handoff_id,
        conversation_id=e.conversation_id,
        occurred_at=when,
    )
    agent = e.payload.agent
    event.agent_message.CopyFrom(
        pb.AgentMessage(
            brevo_message_id=e.payload.brevo_message_id,
            agent=pb.Agent(id=agent.id, name=agent.name, picture_url=agent.picture_url),
            text=e.payload.text,
            html=e.payload.html,
        )
    )
    return pb.StreamAgentRepliesResponse(event=event)


def cost_us(call: Callable[[], object], calls: int) -> float:
    """Microseconds a call, the best of five runs."""
    return min(timeit.repeat(call, number=calls, repeat=5)) / calls * 1e6


def figures(calls: int = CALLS) -> dict[str, float]:
    """Microseconds a call of each hot path, each measured over ``calls`` calls."""
    raw = fragment("visitor-1")
    body = orjson.loads(raw)
    event = parse_webhook(body)
    message = event.messages[0]
    handoff = Handoff(
        id="h-1",
        conversation_id="conversation-1",
        visitor_id="visitor-1",
        state=HandoffState.ACTIVE,
        created_at_ms=1,
        updated_at_ms=1,
        version=5,
        brevo_conversation_id=event.conversation_id,
        agents=(Agent(message.agent_id, message.agent_name),),
    )
    identity = ServiceIdentity("service-agent", "")
    values = tuple("abcdefghijkl")
    stored = StoredEvent(
        123_456,
        handoff.id,
        handoff.conversation_id,
        message.created_at_ms or 0,
        AgentMessage(message.id, Agent(message.agent_id, message.agent_name), message.text),
    )
    assert _item_built_apart(stored) == reply_out(stored)
    return {
        "frozen dataclass, 12 fields": cost_us(lambda: _Frozen(*values), calls),
        "@immutable class, 12 fields": cost_us(lambda: _Immutable(*values), calls),
        "orjson.loads (a fragment)": cost_us(lambda: orjson.loads(raw), calls),
        "parse_webhook (a fragment)": cost_us(lambda: parse_webhook(body), calls),
        "plan_inbound (one agent reply)": cost_us(
            lambda: plan_inbound(
                handoff, event, seen=set(), sent=set(), identity=identity, now_ms=10
            ),
            calls,
        ),
        "Handoff.at_version": cost_us(lambda: handoff.at_version(6), calls),
        "dataclasses.replace(Handoff)": cost_us(
            lambda: dataclasses.replace(handoff, version=6), calls
        ),
        "stream item, built apart": cost_us(lambda: _item_built_apart(stored), calls),
        "stream item, in place (reply_out)": cost_us(lambda: reply_out(stored), calls),
    }


WEBHOOKS = 50_000
CALLERS = 16
HANDOFFS = 50
# IDS_CACHED for the run over the budget: the route's HANDOFFS pass it a third of the way in.
OVER_BUDGET = 20_000
# Message ids the HANDOFFS hold before the run with many ids cached: twice what the budget
# was while ids were cached as strings (100,000), a fifth of the fingerprints' (1,000,000).
SEEDED_IDS = 200_000


async def webhook_cpu_us(
    webhooks: int = WEBHOOKS, ids_cached: int | None = None, seeded_ids: int = 0
) -> tuple[float, dict[int, int]]:
    """CPU per webhook of the gateway's route, called in-process by CALLERS concurrent
    callers with fragments of one agent message each for HANDOFFS handoffs, on a service
    with a new SQLite file (whose IDS_CACHED is ``ids_cached`` when given; whose handoffs
    hold ``seeded_ids`` message ids in all before the first webhook); and the statuses it
    answered."""
    budget = sqlite.IDS_CACHED
    if ids_cached is not None:
        sqlite.IDS_CACHED = ids_cached
    try:
        return await _webhook_cpu_us(webhooks, seeded_ids)
    finally:
        sqlite.IDS_CACHED = budget


async def _seed_ids(store: HandoffStore, handoff_ids: list[str], count: int) -> None:
    """``count`` seen message ids in all, spread evenly over the handoffs, stored as a
    webhook's commit stores them, each handoff's ids loaded first as its first webhook
    loads them."""
    each = count // len(handoff_ids)
    for n, handoff_id in enumerate(handoff_ids):
        handoff = (await store.read_for_webhook(handoff_id, [])).handoff
        assert handoff is not None
        ids = tuple(f"seeded-{n}-{k}" for k in range(each))
        await store.commit(Commit(handoff, handoff.version, seen_message_ids=ids))


def sandbox_config(sqlite_path: Path) -> Config:
    """The service's configuration for an in-process run: the built-in sandbox with no
    simulated agent, SQLite at ``sqlite_path``, every port the system's choice."""
    return load_config(
        [
            "--host=127.0.0.1",
            "--grpc-port=0",
            "--http-port=0",
            "--sandbox-port=0",
            "--sandbox-agent=off",
            f"--sqlite-path={sqlite_path}",
            "--brevo-agent-id=bench-service-agent",
        ],
        environ={},
    )


async def post_in_process(app: Gateway, path: str, body: bytes) -> int:
    """``body`` posted to the gateway's ASGI app called directly (no HTTP server, no
    socket); the status it answered."""
    statuses: list[int] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, object]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(int(str(message["status"])))

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 40000),
    }
    await app(scope, receive, send)  # type: ignore[arg-type]
    return statuses[0]


async def _webhook_cpu_us(webhooks: int, seeded_ids: int) -> tuple[float, dict[int, int]]:
    with tempfile.TemporaryDirectory() as folder:
        running = await start_service(sandbox_config(Path(folder) / "micro.db"))
        try:
            visitors = []
            handoff_ids = []
            for n in range(HANDOFFS):
                handoff, _ = await running.manager.start(StartRequest(f"micro-{n}"))
                visitors.append(handoff.visitor_id)
                handoff_ids.append(handoff.id)
            if seeded_ids:
                await _seed_ids(running.store, handoff_ids, seeded_ids)
            route = create_gateway(running.manager, TokenSet(["micro"]), 1 << 20, Metrics())
            bodies = iter([fragment(visitors[n % HANDOFFS]) for n in range(webhooks)])
            statuses: dict[int, int] = {}

            async def call(body: bytes) -> None:
                status = await post_in_process(route, "/webhooks/brevo/micro", body)
                statuses[status] = statuses.get(status, 0) + 1

            async def caller(todo: itertools.islice[bytes]) -> None:
                for body in todo:
                    await call(body)

            warm_up = itertools.islice(bodies, webhooks // 10)
            await asyncio.gather(*(caller(warm_up) for _ in range(CALLERS)))
            measured = itertools.islice(bodies, webhooks)
            started = time.process_time()
            await asyncio.gather(*(caller(measured) for _ in range(CALLERS)))
            spent = time.process_time() - started
        finally:
            await running.stop()
    return spent / (webhooks - webhooks // 10) * 1e6, statuses


def main() -> None:
    for name, us in figures().items():
        print(f"{name:34s} {us:6.2f} µs")
    cpu_us, statuses = asyncio.run(webhook_cpu_us())
    print(f"{'webhook route, in-process':34s} {cpu_us:6.2f} µs of CPU a webhook {statuses}")
    cpu_us, statuses = asyncio.run(webhook_cpu_us(ids_cached=OVER_BUDGET))
    name = f"the same, IDS_CACHED {OVER_BUDGET:,}"
    print(f"{name:34s} {cpu_us:6.2f} µs of CPU a webhook {statuses}")
    cpu_us, statuses = asyncio.run(webhook_cpu_us(seeded_ids=SEEDED_IDS))
    name = f"the same, {SEEDED_IDS:,} ids held first"
    print(f"{name:34s} {cpu_us:6.2f} µs of CPU a webhook {statuses}")


if __name__ == "__main__":
    main()
