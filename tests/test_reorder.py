"""The reorder window's rules without any I/O (service/core/reorder.py and its use by
plan_inbound): what is held, what is due, and in which order it reaches the log."""

from __future__ import annotations

import dataclasses

from service.core.brevo_payloads import BrevoMessage, WebhookEvent
from service.core.inbound import ServiceIdentity, plan_inbound
from service.core.models import (
    Agent,
    AgentJoined,
    AgentMessage,
    EndReason,
    Handoff,
    HandoffEnded,
    HandoffState,
    HeldMessage,
    NewEvent,
)
from service.core.reorder import release_held

ME = ServiceIdentity(agent_id="Me", received_from="handoff-service")
ANN = Agent("A1", "Ann")
BOB = Agent("A2", "Bob")
HANDOFF = Handoff(
    id="ho_1",
    conversation_id="c",
    visitor_id="hf_1",
    state=HandoffState.PENDING_AGENT,
    created_at_ms=1,
    updated_at_ms=1,
)


def held(
    mid: str, created: int, arrived: int, window: int = 100, agent: Agent = ANN
) -> HeldMessage:
    return HeldMessage(AgentMessage(mid, agent, mid), created, arrived, arrived + window)


def fragment(*messages: tuple[str, int]) -> WebhookEvent:
    return WebhookEvent(
        "conversationFragment",
        "conv",
        "hf_1",
        tuple(
            BrevoMessage(
                id=mid, type="agent", text=mid, created_at_ms=at, agent_id="A1", agent_name="Ann"
            )
            for mid, at in messages
        ),
    )


def ids(events: tuple[NewEvent, ...]) -> list[str]:
    return [
        e.payload.brevo_message_id
        if isinstance(e.payload, AgentMessage)
        else type(e.payload).__name__
        for e in events
    ]


def test_nothing_is_released_before_its_time() -> None:
    h = dataclasses.replace(HANDOFF, held=(held("m1", 10, 1000),))
    assert release_held(h, 1099) == (h, ())


def test_a_due_message_goes_with_every_earlier_created_one_in_created_order() -> None:
    # m3 arrived first and is due; m1 and m2 were created before it but arrived later (not
    # yet due): they must go first. m4, created after m3 and not due, stays.
    h = dataclasses.replace(
        HANDOFF,
        held=(
            held("m3", 30, 1000),
            held("m4", 40, 1050),
            held("m1", 10, 1060),
            held("m2", 20, 1070),
        ),
    )
    released, events = release_held(h, 1100)
    assert ids(events) == ["AgentJoined", "m1", "m2", "m3"]
    assert [e.occurred_at_ms for e in events] == [10, 10, 20, 30]
    assert [e.received_at_ms for e in events] == [1060, 1060, 1070, 1000]
    assert released.held == (held("m4", 40, 1050),)
    assert released.state is HandoffState.ACTIVE
    assert released.agents == (ANN,)
    assert released.updated_at_ms == 1100
    # m4 when its time comes; Ann has joined already.
    later, more = release_held(released, 1150)
    assert ids(more) == ["m4"]
    assert later.held == ()
    assert later.updated_at_ms == 1100  # already active: no state change


def test_flush_releases_everything_and_ties_keep_arrival_order() -> None:
    h = dataclasses.replace(
        HANDOFF,
        agents=(ANN,),
        state=HandoffState.ACTIVE,
        no_agent_available=True,
        held=(held("b", 20, 1000), held("a", 20, 1001, agent=BOB), held("c", 5, 1002)),
    )
    released, events = release_held(h, 0, flush=True)
    assert [e.payload for e in events] == [
        AgentMessage("c", ANN, "c"),
        AgentMessage("b", ANN, "b"),
        AgentJoined(BOB),
        AgentMessage("a", BOB, "a"),
    ]
    assert released.held == ()
    assert released.no_agent_available is False
    assert released.agents == (ANN, BOB)


def test_without_a_window_a_delivery_goes_to_the_log_at_once() -> None:
    plan = plan_inbound(
        HANDOFF,
        fragment(("m2", 20), ("m1", 10)),
        seen=set(),
        sent=set(),
        identity=ME,
        now_ms=500,
        received_at_ms=490,
    )
    assert ids(plan.events) == ["AgentJoined", "m1", "m2"]
    assert {e.received_at_ms for e in plan.events} == {490}
    assert plan.handoff.held == ()
    assert plan.handoff.state is HandoffState.ACTIVE


def test_with_a_window_a_late_delivery_still_goes_first() -> None:
    first = plan_inbound(
        HANDOFF,
        fragment(("m2", 20)),
        seen=set(),
        sent=set(),
        identity=ME,
        now_ms=1000,
        reorder_window_ms=300,
    )
    assert first.events == ()
    assert first.seen_message_ids == ("m2",)  # remembered at once: a repeat is a duplicate
    assert first.handoff.held == (HeldMessage(AgentMessage("m2", ANN, "m2"), 20, 1000, 1300),)
    assert first.handoff.state is HandoffState.PENDING_AGENT
    # The earlier message arrives 200 ms later; a repeat of m2 with it is dropped.
    second = plan_inbound(
        dataclasses.replace(first.handoff, version=1),
        fragment(("m1", 10), ("m2", 20)),
        seen={"m2"},
        sent=set(),
        identity=ME,
        now_ms=1200,
        reorder_window_ms=300,
    )
    assert second.events == ()
    assert second.dropped["duplicate"] == 1
    assert [m.message.brevo_message_id for m in second.handoff.held] == ["m2", "m1"]
    # At 1300 m2 is due, and m1, created before it, goes first.
    released, events = release_held(second.handoff, 1300)
    assert ids(events) == ["AgentJoined", "m1", "m2"]
    assert released.held == ()


def test_a_transcript_flushes_what_is_held_before_the_end() -> None:
    h = dataclasses.replace(HANDOFF, held=(held("m2", 20, 1000),))
    transcript = dataclasses.replace(
        fragment(("m1", 10), ("m2", 20)), event_name="conversationTranscript"
    )
    plan = plan_inbound(
        h, transcript, seen={"m2"}, sent=set(), identity=ME, now_ms=1001, reorder_window_ms=300
    )
    assert ids(plan.events) == ["AgentJoined", "m1", "m2", "HandoffEnded"]
    assert plan.events[-1].payload == HandoffEnded(EndReason.AGENT_CLOSED)
    assert plan.handoff.held == ()
    assert plan.handoff.state is HandoffState.ENDED


def test_arriving_messages_join_those_held_before_they_are_judged() -> None:
    waiting = dataclasses.replace(HANDOFF, held=(held("m2", 20, 1000),))
    # Not due yet: both are held, the older one first in arrival order as given.
    kept, events = release_held(waiting, 1050, arriving=(held("m1", 10, 1040),))
    assert events == ()
    assert [m.message.brevo_message_id for m in kept.held] == ["m2", "m1"]
    # m2 is due: m1, created before it, goes first though it arrived later.
    released, events = release_held(waiting, 1100, arriving=(held("m1", 10, 1040),))
    assert ids(events) == ["AgentJoined", "m1", "m2"]
    assert released.held == ()
    assert released.state is HandoffState.ACTIVE
    # Nothing held and nothing arriving: the very same record.
    assert release_held(HANDOFF, 1100, arriving=()) == (HANDOFF, ())
