"""JSON forms of handoffs and event payloads, shared by every storage backend.

Encoded with orjson: a handoff record is written on every change, and the standard library's
encoder was a tenth of a webhook's CPU in a py-spy profile under make bench's load. What
orjson cannot encode (nothing the service makes today: texts arrive without lone surrogates,
numbers within 64 bits) falls back to the standard library, so nothing is refused for it.
"""

from __future__ import annotations

import json

import orjson

from service.core.models import (
    Agent,
    AgentJoined,
    AgentMessage,
    Attachment,
    AttachmentKind,
    EndReason,
    EventPayload,
    Handoff,
    HandoffEnded,
    HandoffState,
    HeldMessage,
    NoAgentAvailable,
)

JsonObject = dict[str, object]


def _agent_json(agent: Agent) -> JsonObject:
    return {"id": agent.id, "name": agent.name, "picture_url": agent.picture_url}


def _agent(raw: object) -> Agent:
    obj = _obj(raw)
    return Agent(id=_s(obj, "id"), name=_s(obj, "name"), picture_url=_s(obj, "picture_url"))


def _attachment_json(a: Attachment) -> JsonObject:
    return {
        "url": a.url,
        "name": a.name,
        "mime_type": a.mime_type,
        "kind": a.kind.value,
        "size_bytes": a.size_bytes,
        "width": a.width,
        "height": a.height,
        "preview_url": a.preview_url,
    }


def _attachment(raw: object) -> Attachment:
    obj = _obj(raw)
    return Attachment(
        url=_s(obj, "url"),
        name=_s(obj, "name"),
        mime_type=_s(obj, "mime_type"),
        kind=AttachmentKind(_s(obj, "kind") or AttachmentKind.FILE.value),
        size_bytes=_i(obj, "size_bytes"),
        width=_i(obj, "width"),
        height=_i(obj, "height"),
        preview_url=_s(obj, "preview_url"),
    )


def json_text(obj: JsonObject) -> str:
    """Compact JSON: orjson, or the standard library for what orjson refuses."""
    try:
        return orjson.dumps(obj).decode()
    except TypeError:
        return json.dumps(obj, separators=(",", ":"))


def handoff_to_json(h: Handoff, *, version: int | None = None) -> str:
    """``h`` as stored; ``version`` (default ``h.version``) is the version to store it at."""
    return json_text(
        {
            "id": h.id,
            "conversation_id": h.conversation_id,
            "visitor_id": h.visitor_id,
            "state": h.state.value,
            "created_at_ms": h.created_at_ms,
            "updated_at_ms": h.updated_at_ms,
            "version": h.version if version is None else version,
            "end_reason": h.end_reason.value if h.end_reason else None,
            "brevo_conversation_id": h.brevo_conversation_id,
            "agents": [_agent_json(a) for a in h.agents],
            "metadata": h.metadata,
            "no_agent_available": h.no_agent_available,
            "opening_parts": list(h.opening_parts),
            "opening_posted": h.opening_posted,
            "held": [_held_json(m) for m in h.held],
        }
    )


def handoff_from_json(text: str) -> Handoff:
    obj = _obj(orjson.loads(text))
    end = obj.get("end_reason")
    metadata = _obj(obj.get("metadata"))
    parts = obj.get("opening_parts")
    agents = obj.get("agents")
    held = obj.get("held")
    return Handoff(
        id=_s(obj, "id"),
        conversation_id=_s(obj, "conversation_id"),
        visitor_id=_s(obj, "visitor_id"),
        state=HandoffState(_s(obj, "state")),
        created_at_ms=_i(obj, "created_at_ms"),
        updated_at_ms=_i(obj, "updated_at_ms"),
        version=_i(obj, "version"),
        end_reason=EndReason(end) if isinstance(end, str) else None,
        brevo_conversation_id=_s(obj, "brevo_conversation_id"),
        agents=tuple(_agent(a) for a in agents) if isinstance(agents, list) else (),
        metadata={str(k): str(v) for k, v in metadata.items()},
        no_agent_available=obj.get("no_agent_available") is True,
        opening_parts=tuple(str(p) for p in parts) if isinstance(parts, list) else (),
        opening_posted=_i(obj, "opening_posted"),
        held=tuple(_held(m) for m in held) if isinstance(held, list) else (),
    )


def _held_json(m: HeldMessage) -> JsonObject:
    return {
        "message": _payload_json(m.message),
        "created_at_ms": m.created_at_ms,
        "arrived_at_ms": m.arrived_at_ms,
        "release_at_ms": m.release_at_ms,
    }


def _held(raw: object) -> HeldMessage:
    obj = _obj(raw)
    message = _payload(_obj(obj.get("message")))
    if not isinstance(message, AgentMessage):
        raise ValueError(f"a held message must be an agent message, not {message!r}")
    return HeldMessage(
        message,
        created_at_ms=_i(obj, "created_at_ms"),
        arrived_at_ms=_i(obj, "arrived_at_ms"),
        release_at_ms=_i(obj, "release_at_ms"),
    )


def payload_to_json(payload: EventPayload) -> str:
    return json_text(_payload_json(payload))


def _payload_json(payload: EventPayload) -> JsonObject:
    body: JsonObject
    match payload:
        case AgentMessage():
            body = {
                "type": "agent_message",
                "brevo_message_id": payload.brevo_message_id,
                "agent": _agent_json(payload.agent),
                "text": payload.text,
                "html": payload.html,
                "attachments": [_attachment_json(a) for a in payload.attachments],
            }
        case AgentJoined():
            body = {"type": "agent_joined", "agent": _agent_json(payload.agent)}
        case NoAgentAvailable():
            body = {"type": "no_agent_available"}
        case HandoffEnded():
            body = {"type": "handoff_ended", "reason": payload.reason.value}
    return body


def payload_from_json(text: str) -> EventPayload:
    return _payload(_obj(orjson.loads(text)))


def _payload(obj: dict[str, object]) -> EventPayload:
    kind = obj.get("type")
    if kind == "agent_message":
        attachments = obj.get("attachments")
        return AgentMessage(
            brevo_message_id=_s(obj, "brevo_message_id"),
            agent=_agent(obj.get("agent")),
            text=_s(obj, "text"),
            html=_s(obj, "html"),
            attachments=tuple(_attachment(a) for a in attachments)
            if isinstance(attachments, list)
            else (),
        )
    if kind == "agent_joined":
        return AgentJoined(_agent(obj.get("agent")))
    if kind == "no_agent_available":
        return NoAgentAvailable()
    if kind == "handoff_ended":
        return HandoffEnded(EndReason(_s(obj, "reason")))
    raise ValueError(f"unknown stored event type {kind!r}")


def _obj(raw: object) -> dict[str, object]:
    return {str(k): v for k, v in raw.items()} if isinstance(raw, dict) else {}


def _s(obj: dict[str, object], key: str) -> str:
    value = obj.get(key)
    return value if isinstance(value, str) else ""


def _i(obj: dict[str, object], key: str) -> int:
    value = obj.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
