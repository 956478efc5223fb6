"""The reorder window: agent messages wait a moment before they enter the event log.

Brevo may deliver two webhooks out of order, and a stream must not show a reply before the
one the agent wrote first. Each accepted agent message is held (stored with the handoff,
so a restart keeps it) until its arrival plus the window; then it goes to the log together
with every held message created no later than it, in ``createdAt`` order. A message
delivered later than the window after a newer one cannot go before it any more: it goes
next, still exactly once.

A window of 0 holds nothing: a delivery's messages go to the log at once, in ``createdAt``
order within the delivery.

Pure: no I/O, no clock; the caller says what time it is.
"""

from __future__ import annotations

import dataclasses

from service.core.models import (
    AgentJoined,
    Handoff,
    HandoffState,
    HeldMessage,
    NewEvent,
)


def release_held(
    handoff: Handoff,
    now_ms: int,
    *,
    flush: bool = False,
    arriving: tuple[HeldMessage, ...] = (),
) -> tuple[Handoff, tuple[NewEvent, ...]]:
    """The handoff with its due held messages moved to events, and those events.

    ``arriving``: messages to hold after those the handoff holds already (one copy of the
    record for both: a webhook's messages usually go straight through).
    Due: every held message whose release time has come, and every one created no later
    than the newest of those (it must go first). ``flush`` releases all of them (the
    handoff is ending). An agent's first message is preceded by ``AgentJoined``.
    """
    holding = (*handoff.held, *arriving) if arriving else handoff.held
    if not holding:
        return handoff, ()
    # Stable: messages created at the same time keep their arrival order.
    ordered = sorted(holding, key=_created) if len(holding) > 1 else list(holding)
    if flush:
        cut = len(ordered)
    else:
        due = [m.created_at_ms for m in ordered if m.release_at_ms <= now_ms]
        if not due:
            return (dataclasses.replace(handoff, held=holding) if arriving else handoff), ()
        newest_due = max(due)
        cut = 0
        for m in ordered:
            if m.created_at_ms <= newest_due:
                cut += 1
    released, kept = ordered[:cut], ordered[cut:]
    agents = list(handoff.agents)
    events: list[NewEvent] = []
    # ``released`` is never empty here: ``flush`` with something held, or a due message.
    for held in released:
        agent = held.message.agent
        for known in agents:  # a loop, not all() over a generator: once a message released
            if known.id == agent.id:
                break
        else:
            agents.append(agent)
            events.append(NewEvent(held.created_at_ms, AgentJoined(agent), held.arrived_at_ms))
        events.append(NewEvent(held.created_at_ms, held.message, held.arrived_at_ms))
    if (
        not kept
        and not handoff.held
        and len(agents) == len(handoff.agents)
        and handoff.state is HandoffState.ACTIVE
        and not handoff.no_agent_available
    ):
        return handoff, tuple(events)  # the usual reply: the record stays as it was
    changed = dataclasses.replace(
        handoff,
        held=tuple(kept),
        agents=tuple(agents),
        state=HandoffState.ACTIVE,
        no_agent_available=False,
        updated_at_ms=now_ms if handoff.state is not HandoffState.ACTIVE else handoff.updated_at_ms,
    )
    return changed, tuple(events)


def _created(message: HeldMessage) -> int:
    return message.created_at_ms
