"""What a Brevo webhook means for a handoff: the rules that turn messages into stream events.

Pure: given the handoff, the parsed webhook and what the store already knows (seen and sent
message ids), returns the handoff's next state, the events to append and the ids to remember.
"""

from __future__ import annotations

import dataclasses

from service.core.brevo_payloads import (
    CONVERSATION_TRANSCRIPT,
    BrevoFile,
    BrevoMessage,
    WebhookEvent,
)
from service.core.immutable import immutable
from service.core.models import (
    Agent,
    AgentMessage,
    Attachment,
    AttachmentKind,
    EndReason,
    Handoff,
    HandoffEnded,
    HandoffState,
    HeldMessage,
    NewEvent,
    NoAgentAvailable,
)
from service.core.reorder import release_held


@immutable
class ServiceIdentity:
    """How the service's own posts look when Brevo echoes them back."""

    agent_id: str
    received_from: str


@immutable
class InboundPlan:
    handoff: Handoff
    events: tuple[NewEvent, ...]
    seen_message_ids: tuple[str, ...]
    dropped: dict[str, int]  # messages not emitted, by reason

    @property
    def changes_anything(self) -> bool:
        return bool(self.events or self.seen_message_ids)


def plan_inbound(
    handoff: Handoff,
    event: WebhookEvent,
    *,
    seen: set[str],
    sent: set[str],
    identity: ServiceIdentity,
    now_ms: int,
    received_at_ms: int | None = None,
    reorder_window_ms: int = 0,
) -> InboundPlan:
    """Applies one webhook to one handoff.

    - messages are handled in ``createdAt`` order (arrival order breaks ties and fills gaps);
    - a message id handled before (this delivery or an earlier one) is skipped;
    - visitor, pushed and trigger messages and the service's own echoes are dropped;
      echoes are recognised by the stored id, then ``receivedFrom``, then the agent id;
    - the agent messages left are held for ``reorder_window_ms`` (see ``reorder``), and
      what is due goes to the log; an agent's first message is preceded by ``AgentJoined``;
    - ``isNoAvailableAgent`` gives ``NoAgentAvailable`` each time it turns true;
    - a webhook whose every message was handled before changes nothing, not even the
      flags it carries: it is a redelivery (Brevo retries for hours), or a repeat such as
      conversationStarted's message in the fragment after it, and its flags are as old as
      its messages (a stale "no agent available" after an agent joined, say);
    - a transcript ends the handoff after every agent message not yet emitted.

    ``received_at_ms`` (default ``now_ms``) is when the webhook reached the service; its
    events carry it, for the latency metric.
    """
    received = now_ms if received_at_ms is None else received_at_ms
    dropped: dict[str, int] = {}  # (a Counter took a microsecond to make, every webhook)
    if not handoff.is_open:
        dropped["handoff_ended"] = len(event.messages)
        return InboundPlan(handoff, (), (), dropped)

    known = list(handoff.agents)
    if handoff.held:
        known += [m.message.agent for m in handoff.held]
    held: list[HeldMessage] = []
    handled: list[str] = []
    handled_here: set[str] = set()
    for message in sort_messages(event.messages, now_ms):
        if message.id in seen or message.id in handled_here:
            dropped["duplicate"] = dropped.get("duplicate", 0) + 1
            continue
        handled_here.add(message.id)
        handled.append(message.id)
        reason = drop_reason(message, sent=sent, identity=identity)
        if reason is not None:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        agent = _agent_of(message, event, known)
        for k in known:  # a loop, not all() over a generator: every agent message passes here
            if k.id == agent.id:
                break
        else:
            known.append(agent)
        held.append(
            HeldMessage(
                AgentMessage(
                    brevo_message_id=message.id,
                    agent=agent,
                    text=message.text,
                    html=message.html,
                    attachments=tuple([_attachment(f) for f in message.files]),
                ),
                created_at_ms=_time(message, now_ms),
                arrived_at_ms=received,
                release_at_ms=received + reorder_window_ms,
            )
        )

    transcript = event.event_name == CONVERSATION_TRANSCRIPT
    if event.messages and not handled and not transcript:
        return InboundPlan(handoff, (), (), dropped)  # a redelivery: nothing in it is new

    events: list[NewEvent] = []
    no_agent = handoff.no_agent_available
    brevo_conversation_id = event.conversation_id or handoff.brevo_conversation_id
    if event.no_agent_available is True and not no_agent:
        events.append(NewEvent(now_ms, NoAgentAvailable(), received))
        no_agent = True
    elif event.no_agent_available is False:
        no_agent = False
    base = handoff
    if (no_agent, brevo_conversation_id) != (
        handoff.no_agent_available,
        handoff.brevo_conversation_id,
    ):
        base = dataclasses.replace(
            handoff, no_agent_available=no_agent, brevo_conversation_id=brevo_conversation_id
        )
    changed, released = release_held(base, now_ms, flush=transcript, arriving=tuple(held))
    events += released
    if transcript:
        events.append(NewEvent(now_ms, HandoffEnded(EndReason.AGENT_CLOSED), received))
        changed = dataclasses.replace(
            changed,
            state=HandoffState.ENDED,
            end_reason=EndReason.AGENT_CLOSED,
            updated_at_ms=now_ms,
        )
    if not events and not handled and changed == handoff:
        return InboundPlan(handoff, (), (), dropped)
    return InboundPlan(changed, tuple(events), tuple(handled), dropped)


def sort_messages(messages: tuple[BrevoMessage, ...], now_ms: int) -> list[BrevoMessage]:
    """createdAt order; a message without createdAt counts as arriving now; ties keep arrival."""
    if len(messages) == 1:  # the usual webhook
        return list(messages)
    indexed = list(enumerate(messages))
    indexed.sort(key=lambda pair: (_time(pair[1], now_ms), pair[0]))
    return [message for _, message in indexed]


def _time(message: BrevoMessage, now_ms: int) -> int:
    return message.created_at_ms if message.created_at_ms is not None else now_ms


def drop_reason(message: BrevoMessage, *, sent: set[str], identity: ServiceIdentity) -> str | None:
    """Why a message is not an agent's reply to the end user, or None when it is one."""
    kind = message.type.lower()
    if kind and kind != "agent":
        return "visitor" if kind == "visitor" else "not_agent"
    if not kind and not (message.agent_id or message.agent_name):
        return "not_agent"
    if message.is_pushed:
        return "pushed"
    if message.is_trigger:
        return "trigger"
    if message.id in sent:
        return "echo"
    if identity.received_from and message.received_from == identity.received_from:
        return "echo"
    if identity.agent_id and message.agent_id == identity.agent_id:
        return "echo"
    return None


def _agent_of(message: BrevoMessage, event: WebhookEvent, known: list[Agent]) -> Agent:
    agent_id = message.agent_id or (
        f"name:{message.agent_name}" if message.agent_name else "unknown"
    )
    listed = event.agents.get(message.agent_id) if event.agents else None
    seen = None
    for candidate in known:
        if candidate.id == agent_id:
            seen = candidate
            break
    name = message.agent_name or (listed.name if listed else "") or (seen.name if seen else "")
    picture_url = (
        message.agent_userpic
        or (listed.userpic if listed else "")
        or (seen.picture_url if seen else "")
    )
    if seen is not None and seen.name == name and seen.picture_url == picture_url:
        return seen  # the usual case: an agent the handoff knows, unchanged
    return Agent(agent_id, name, picture_url)


def attachment_kind(mime_type: str, is_image: bool) -> AttachmentKind:
    major = mime_type.split("/", 1)[0].lower()
    if is_image or major == "image":
        return AttachmentKind.IMAGE
    if major == "audio":
        return AttachmentKind.AUDIO
    if major == "video":
        return AttachmentKind.VIDEO
    return AttachmentKind.FILE


def _attachment(file: BrevoFile) -> Attachment:
    return Attachment(
        url=file.link,
        name=file.name,
        mime_type=file.mime_type,
        kind=attachment_kind(file.mime_type, file.is_image),
        size_bytes=file.size,
        width=file.width,
        height=file.height,
        preview_url=file.preview_url,
    )
