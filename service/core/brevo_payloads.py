"""Brevo webhook bodies, parsed leniently into typed values.

Brevo documents few guarantees (see ../shared/brevo/README.md): every field may be missing,
ids may come as numbers, ``file`` has two spellings. A field of the wrong type is noted in
``problems`` and treated as missing; it never drops the rest of the body.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import field
from typing import Final

from service.core.errors import InvalidArgument
from service.core.immutable import immutable

CONVERSATION_STARTED: Final = "conversationStarted"
CONVERSATION_FRAGMENT: Final = "conversationFragment"
CONVERSATION_TRANSCRIPT: Final = "conversationTranscript"
KNOWN_EVENTS: Final = frozenset(
    {CONVERSATION_STARTED, CONVERSATION_FRAGMENT, CONVERSATION_TRANSCRIPT}
)


class InvalidPayload(InvalidArgument):
    """The body is not a Brevo webhook at all (not an object, or no eventName)."""

    def __init__(self, problem: str) -> None:
        super().__init__("body", problem)
        self.problem = problem


@immutable
class BrevoFile:
    name: str = ""
    link: str = ""
    mime_type: str = ""
    size: int = 0
    is_image: bool = False
    width: int = 0
    height: int = 0
    preview_url: str = ""


@immutable
class BrevoMessage:
    id: str
    type: str = ""
    text: str = ""
    html: str = ""
    created_at_ms: int | None = None
    agent_id: str = ""
    agent_name: str = ""
    agent_userpic: str = ""
    received_from: str = ""
    is_pushed: bool = False
    is_trigger: bool = False
    files: tuple[BrevoFile, ...] = ()


@immutable
class BrevoAgent:
    id: str
    name: str = ""
    userpic: str = ""


@immutable
class WebhookEvent:
    event_name: str
    conversation_id: str = ""
    visitor_id: str = ""
    messages: tuple[BrevoMessage, ...] = ()
    agents: dict[str, BrevoAgent] = field(default_factory=dict)
    no_agent_available: bool | None = None
    problems: tuple[str, ...] = ()


MAX_INT64 = 2**63 - 1
MAX_INT32 = 2**31 - 1
# The times a protobuf Timestamp can carry: the years 1 to 9999, in milliseconds.
MIN_TIME_MS = -62_135_596_800_000
MAX_TIME_MS = 253_402_300_799_999


def _clean(value: str) -> str:
    """``value`` without lone surrogates (JSON can escape them; nothing downstream can store
    or send them): each becomes '?'."""
    if value.isascii():  # most texts: nothing to look for
        return value
    return value.encode("utf-8", "replace").decode("utf-8")


class _Reader:
    """Collects what was unusable while reading one body."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def text(self, obj: dict[str, object], key: str, where: str) -> str:
        value = obj.get(key)
        if type(value) is str and value.isascii():  # the usual case: a dozen a webhook
            return value
        return self.text_of(value, key, where)

    def text_of(self, value: object, key: str, where: str) -> str:
        """``value`` (``key`` of ``where``) as text: '' when it is missing or unusable."""
        if value is None:
            return ""
        if isinstance(value, str):
            return _clean(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        self.problems.append(f"{where}.{key} is {type(value).__name__}, expected a string")
        return ""

    def number(self, obj: dict[str, object], key: str, where: str) -> int | None:
        value = obj.get(key)
        if value is None:
            return None
        if isinstance(value, bool):
            self.problems.append(f"{where}.{key} is a boolean, expected a number")
            return None
        if isinstance(value, int) and abs(value) <= MAX_INT64:
            return value
        if isinstance(value, float) and value == value and abs(value) < 1e18:
            return int(value)
        if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) < 19:
            return int(value.strip())
        self.problems.append(f"{where}.{key} is not a usable number")
        return None

    def flag(self, obj: dict[str, object], key: str, where: str) -> bool | None:
        value = obj.get(key)
        if value is None:
            return None
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        self.problems.append(f"{where}.{key} is not a boolean")
        return None

    def mapping(self, obj: dict[str, object], key: str, where: str) -> dict[str, object] | None:
        value = obj.get(key)
        if value is None:
            return None
        if isinstance(value, dict):
            return value  # decoded JSON: its keys are strings
        self.problems.append(f"{where}.{key} is {type(value).__name__}, expected an object")
        return None

    def items(self, obj: dict[str, object], key: str, where: str) -> list[dict[str, object]]:
        value = obj.get(key)
        if value is None:
            return []
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list):
            self.problems.append(f"{where}.{key} is {type(value).__name__}, expected a list")
            return []
        out: list[dict[str, object]] = []
        for index, item in enumerate(value):
            if isinstance(item, dict):
                out.append(item)  # decoded JSON: its keys are strings
            else:
                self.problems.append(f"{where}.{key}[{index}] is not an object; skipped")
        return out

    def file(self, raw: dict[str, object], where: str) -> BrevoFile:
        image = self.mapping(raw, "imageInfo", where) or {}
        size = self.number(raw, "size", where) or 0
        return BrevoFile(
            name=self.text(raw, "name", where) or self.text(raw, "filename", where),
            link=self.text(raw, "link", where) or self.text(raw, "url", where),
            mime_type=self.text(raw, "mimeType", where),
            size=min(max(size, 0), MAX_INT64),
            is_image=bool(self.flag(raw, "isImage", where)),
            width=min(max(self.number(image, "width", where + ".imageInfo") or 0, 0), MAX_INT32),
            height=min(max(self.number(image, "height", where + ".imageInfo") or 0, 0), MAX_INT32),
            preview_url=self.text(image, "previewLink", where + ".imageInfo")
            or self.text(image, "previewUrl", where + ".imageInfo"),
        )

    def message(self, raw: dict[str, object], where: str) -> BrevoMessage:
        get = raw.get
        files: list[BrevoFile] = []
        if get("file") is not None:
            single = self.mapping(raw, "file", where)
            if single is not None:
                files.append(self.file(single, where + ".file"))
        if get("attachments") is not None:
            for index, item in enumerate(self.items(raw, "attachments", where)):
                files.append(self.file(item, f"{where}.attachments[{index}]"))
        created = get("createdAt")
        if type(created) is not int or not MIN_TIME_MS <= created <= MAX_TIME_MS:
            created = self.number(raw, "createdAt", where)
            if created is not None and not MIN_TIME_MS <= created <= MAX_TIME_MS:
                self.problems.append(f"{where}.createdAt is outside the years 1-9999")
                created = None
        # The text fields in one loop rather than a ``text`` call each: a webhook's
        # messages are most of its parsing.
        texts: list[str] = []
        for key in _MESSAGE_TEXTS:
            value = get(key)
            texts.append(
                value if type(value) is str and value.isascii() else self.text_of(value, key, where)
            )
        message_id, kind, text, html, agent_id, agent_name, userpic, received_from = texts
        pushed = get("isPushed")
        trigger = get("isTrigger")
        message = BrevoMessage(
            message_id,
            kind,
            text,
            html,
            created,
            agent_id,
            agent_name,
            userpic,
            received_from,
            pushed if type(pushed) is bool else bool(self.flag(raw, "isPushed", where)),
            trigger if type(trigger) is bool else bool(self.flag(raw, "isTrigger", where)),
            tuple(f for f in files if f.link or f.name) if files else (),
        )
        if not message.id:
            # Without an id a message can still be deduplicated by what it says.
            digest = hashlib.sha256(
                f"{created}\x00{message.agent_id}\x00{message.text}".encode(errors="replace")
            ).hexdigest()[:24]
            message = dataclasses.replace(message, id=f"noid-{digest}")
            self.problems.append(f"{where}.id is missing; deduplicating by content")
        return message


# A message's text fields, in BrevoMessage's order (see _Reader.message).
_MESSAGE_TEXTS: Final = (
    "id",
    "type",
    "text",
    "html",
    "agentId",
    "agentName",
    "agentUserpic",
    "receivedFrom",
)


def parse_webhook(body: object) -> WebhookEvent:
    """Reads a decoded JSON body. Raises InvalidPayload only when it is not a webhook at all."""
    if not isinstance(body, dict):
        raise InvalidPayload(f"expected a JSON object, got {_json_kind(body)}")
    obj: dict[str, object] = body  # decoded JSON: its keys are strings
    name = obj.get("eventName")
    if not isinstance(name, str) or not name:
        raise InvalidPayload("eventName is missing or not a string")
    reader = _Reader()
    if name not in KNOWN_EVENTS:
        return WebhookEvent(event_name=_clean(name))
    raw_messages = reader.items(obj, "messages", "body")
    if name == CONVERSATION_STARTED:
        first = reader.mapping(obj, "message", "body")
        if first is not None:
            raw_messages.insert(0, first)
    messages = tuple(
        [reader.message(raw, f"body.messages[{index}]") for index, raw in enumerate(raw_messages)]
    )
    agents: dict[str, BrevoAgent] = {}
    for index, raw in enumerate(reader.items(obj, "agents", "body")):
        where = f"body.agents[{index}]"
        agent_id = reader.text(raw, "id", where)
        if agent_id:
            agents[agent_id] = BrevoAgent(
                id=agent_id,
                name=reader.text(raw, "name", where),
                userpic=reader.text(raw, "userpic", where),
            )
    visitor_id = ""
    visitor_value = obj.get("visitor")
    if isinstance(visitor_value, str):
        visitor_id = _clean(visitor_value)
    else:
        visitor = reader.mapping(obj, "visitor", "body")
        if visitor is not None:
            visitor_id = reader.text(visitor, "id", "body.visitor")
    if not visitor_id:
        # REST-shaped messages name their visitor; use that when the body does not.
        for raw in raw_messages:
            candidate = raw.get("visitorId")
            if isinstance(candidate, str) and candidate:
                visitor_id = _clean(candidate)
                break
    return WebhookEvent(
        event_name=name,
        conversation_id=reader.text(obj, "conversationId", "body"),
        visitor_id=visitor_id,
        messages=messages,
        agents=agents,
        no_agent_available=reader.flag(obj, "isNoAvailableAgent", "body"),
        problems=tuple(reader.problems),
    )


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__
