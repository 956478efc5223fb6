"""The inbound rules without any I/O: echo tiers, ordering, deduplication, state."""

from __future__ import annotations

import dataclasses

from service.core.brevo_payloads import BrevoMessage, WebhookEvent
from service.core.inbound import (
    InboundPlan,
    ServiceIdentity,
    drop_reason,
    plan_inbound,
    sort_messages,
)
from service.core.models import (
    Agent,
    AgentJoined,
    AgentMessage,
    EndReason,
    Handoff,
    HandoffEnded,
    HandoffState,
    NoAgentAvailable,
)

ME = ServiceIdentity(agent_id="Me", received_from="handoff-service")
HANDOFF = Handoff(
    id="ho_1",
    conversation_id="c",
    visitor_id="hf_1",
    state=HandoffState.PENDING_AGENT,
    created_at_ms=1,
    updated_at_ms=1,
)


def agent_msg(mid: str, at: int | None, agent: str = "A1", text: str = "hi") -> BrevoMessage:
    return BrevoMessage(
        id=mid, type="agent", text=text, created_at_ms=at, agent_id=agent, agent_name=agent
    )


def fragment(*messages: BrevoMessage, no_agent: bool | None = None) -> WebhookEvent:
    return WebhookEvent(
        "conversationFragment", "conv", "hf_1", tuple(messages), no_agent_available=no_agent
    )


def test_each_echo_tier_is_recognised_on_its_own() -> None:
    sent = {"S1"}
    stored_id_only = BrevoMessage(id="S1", type="agent", agent_id="Other")
    tag_only = BrevoMessage(id="x", type="agent", agent_id="Other", received_from="handoff-service")
    agent_id_only = BrevoMessage(id="y", type="agent", agent_id="Me")
    human = BrevoMessage(id="z", type="agent", agent_id="Other", received_from="another-tool")
    assert drop_reason(stored_id_only, sent=sent, identity=ME) == "echo"
    assert drop_reason(tag_only, sent=sent, identity=ME) == "echo"
    assert drop_reason(agent_id_only, sent=sent, identity=ME) == "echo"
    assert drop_reason(human, sent=sent, identity=ME) is None


def test_visitor_pushed_trigger_and_untyped_messages_are_dropped() -> None:
    none: set[str] = set()
    assert drop_reason(BrevoMessage(id="v", type="visitor"), sent=none, identity=ME) == "visitor"
    pushed = BrevoMessage(id="p", type="agent", agent_id="A", is_pushed=True)
    assert drop_reason(pushed, sent=none, identity=ME) == "pushed"
    trigger = BrevoMessage(id="t", type="agent", agent_id="A", is_trigger=True)
    assert drop_reason(trigger, sent=none, identity=ME) == "trigger"
    assert drop_reason(BrevoMessage(id="u"), sent=none, identity=ME) == "not_agent"
    # No type but an agent id: an agent's message with a field missing.
    assert drop_reason(BrevoMessage(id="a", agent_id="A"), sent=none, identity=ME) is None


def test_sorting_by_created_at_keeps_arrival_for_ties_and_missing_times() -> None:
    ms = (agent_msg("c", 30), agent_msg("a", 10), agent_msg("n", None), agent_msg("b", 10))
    assert [m.id for m in sort_messages(ms, now_ms=20)] == ["a", "b", "n", "c"]


def test_plan_emits_joined_then_messages_and_activates() -> None:
    plan = plan_inbound(
        HANDOFF,
        fragment(agent_msg("m2", 20, "A2"), agent_msg("m1", 10, "A1"), agent_msg("m3", 30, "A1")),
        seen=set(),
        sent=set(),
        identity=ME,
        now_ms=99,
    )
    payloads = [e.payload for e in plan.events]
    assert payloads == [
        AgentJoined(Agent("A1", "A1")),
        AgentMessage("m1", Agent("A1", "A1"), "hi"),
        AgentJoined(Agent("A2", "A2")),
        AgentMessage("m2", Agent("A2", "A2"), "hi"),
        AgentMessage("m3", Agent("A1", "A1"), "hi"),
    ]
    assert [e.occurred_at_ms for e in plan.events] == [10, 10, 20, 20, 30]
    assert plan.handoff.state is HandoffState.ACTIVE
    assert plan.handoff.updated_at_ms == 99
    assert plan.seen_message_ids == ("m1", "m2", "m3")
    assert [a.id for a in plan.handoff.agents] == ["A1", "A2"]


def test_seen_ids_and_repeats_within_a_batch_are_skipped() -> None:
    plan = plan_inbound(
        dataclasses.replace(HANDOFF, agents=(Agent("A1", "A1"),), state=HandoffState.ACTIVE),
        fragment(agent_msg("old", 1), agent_msg("new", 2), agent_msg("new", 2)),
        seen={"old"},
        sent=set(),
        identity=ME,
        now_ms=5,
    )
    assert [e.payload for e in plan.events] == [AgentMessage("new", Agent("A1", "A1"), "hi")]
    assert plan.dropped["duplicate"] == 2


def test_no_agent_flag_once_per_change_and_reset_by_an_agent_message() -> None:
    first = plan_inbound(
        HANDOFF, fragment(no_agent=True), seen=set(), sent=set(), identity=ME, now_ms=1
    )
    assert [e.payload for e in first.events] == [NoAgentAvailable()]
    again = plan_inbound(
        first.handoff, fragment(no_agent=True), seen=set(), sent=set(), identity=ME, now_ms=2
    )
    assert again.events == ()
    assert not again.changes_anything
    answered = plan_inbound(
        first.handoff, fragment(agent_msg("m", 3)), seen=set(), sent=set(), identity=ME, now_ms=3
    )
    assert answered.handoff.no_agent_available is False
    later = plan_inbound(
        answered.handoff, fragment(no_agent=True), seen=set(), sent=set(), identity=ME, now_ms=4
    )
    assert [e.payload for e in later.events] == [NoAgentAvailable()]


def test_a_redelivery_changes_nothing_not_even_the_flags_it_carries() -> None:
    # Marta answered (so agents are available) in Brevo chat "conv"; hours later Brevo
    # redelivers an older fragment, produced when nobody was online, that names another chat.
    active = dataclasses.replace(
        HANDOFF,
        agents=(Agent("A1", "A1"),),
        state=HandoffState.ACTIVE,
        brevo_conversation_id="conv",
    )
    stale = WebhookEvent(
        "conversationFragment",
        "older-chat",
        "hf_1",
        (agent_msg("m1", 1), agent_msg("m2", 2)),
        no_agent_available=True,
    )
    plan = plan_inbound(active, stale, seen={"m1", "m2"}, sent=set(), identity=ME, now_ms=9)
    assert plan == InboundPlan(active, (), (), {"duplicate": 2})
    assert not plan.changes_anything
    # One new message in the same delivery makes its flags current: they apply.
    fresh = dataclasses.replace(stale, messages=(*stale.messages, agent_msg("m3", 3)))
    plan = plan_inbound(active, fresh, seen={"m1", "m2"}, sent=set(), identity=ME, now_ms=9)
    assert [e.payload for e in plan.events] == [
        NoAgentAvailable(),
        AgentMessage("m3", Agent("A1", "A1"), "hi"),
    ]
    assert plan.handoff.brevo_conversation_id == "older-chat"
    assert plan.seen_message_ids == ("m3",)


def test_a_transcript_of_known_messages_still_ends_the_handoff() -> None:
    active = dataclasses.replace(HANDOFF, agents=(Agent("A1", "A1"),), state=HandoffState.ACTIVE)
    transcript = WebhookEvent("conversationTranscript", "conv", "hf_1", (agent_msg("m1", 1),))
    plan = plan_inbound(active, transcript, seen={"m1"}, sent=set(), identity=ME, now_ms=9)
    assert [e.payload for e in plan.events] == [HandoffEnded(EndReason.AGENT_CLOSED)]
    assert plan.handoff.state is HandoffState.ENDED
    assert plan.dropped == {"duplicate": 1}


def test_transcript_ends_after_recovered_messages_and_ended_handoffs_take_nothing() -> None:
    transcript = WebhookEvent(
        "conversationTranscript", "conv", "hf_1", (agent_msg("m1", 5), agent_msg("m0", 1))
    )
    plan = plan_inbound(HANDOFF, transcript, seen={"m0"}, sent=set(), identity=ME, now_ms=9)
    assert [type(e.payload) for e in plan.events] == [AgentJoined, AgentMessage, HandoffEnded]
    assert plan.events[-1].payload == HandoffEnded(EndReason.AGENT_CLOSED)
    assert plan.handoff.state is HandoffState.ENDED
    assert plan.handoff.end_reason is EndReason.AGENT_CLOSED
    after = plan_inbound(
        plan.handoff, fragment(agent_msg("m9", 10)), seen=set(), sent=set(), identity=ME, now_ms=10
    )
    assert after.events == ()
    assert after.dropped["handoff_ended"] == 1


def test_agent_name_and_picture_come_from_agents_list_or_earlier_messages() -> None:
    known = dataclasses.replace(HANDOFF, agents=(Agent("A1", "Ann", "pic-a"),))
    bare = BrevoMessage(id="m", type="agent", agent_id="A1", created_at_ms=1)
    plan = plan_inbound(known, fragment(bare), seen=set(), sent=set(), identity=ME, now_ms=2)
    assert plan.events[0].payload == AgentMessage("m", Agent("A1", "Ann", "pic-a"), "")
