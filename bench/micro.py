"""``python -m bench.micro``: what one call of the core's hot paths costs, in-process.

The figures the code's comments quote about a webhook's own work (parsing, planning, the
value classes) come from here; ``make bench`` measures the service as a whole. Each figure
is the best of five runs of ``timeit`` on one process, in microseconds a call; like every
timing on these machines it moves by a tenth or so between runs, so compare figures of one
run with each other.
"""

from __future__ import annotations

import dataclasses
import timeit
from collections.abc import Callable

import orjson

from bench.scenarios import fragment
from service.core.brevo_payloads import parse_webhook
from service.core.immutable import immutable
from service.core.inbound import ServiceIdentity, plan_inbound
from service.core.models import Agent, Handoff, HandoffState

CALLS = 100_000


@dataclasses.dataclass(frozen=True, slots=True)
class _Frozen:
    a: str
    b: str
    c: str
    d: str
    e: int
    f: str
    g: str
    h: str
    i: str
    j: bool
    k: bool
    m: tuple[str, ...]


@immutable
class _Immutable:
    a: str
    b: str
    c: str
    d: str
    e: int
    f: str
    g: str
    h: str
    i: str
    j: bool
    k: bool
    m: tuple[str, ...]


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
    values = ("a", "b", "c", "d", 1, "f", "g", "h", "i", False, False, ())
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
    }


def main() -> None:
    for name, us in figures().items():
        print(f"{name:34s} {us:6.2f} µs")


if __name__ == "__main__":
    main()
