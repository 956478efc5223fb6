"""What the service writes to the agent: the opening message, relayed user messages, notices."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from service.core.models import Attachment, HistoryTurn, Role, User

OPENING_TITLE = "*New handoff request*"
HISTORY_TITLE = "*Conversation so far*"


def opening_parts(
    *,
    user: User,
    title: str,
    description: str,
    history: Sequence[HistoryTurn],
    max_chars: int,
) -> tuple[str, ...]:
    """The opening message, split into parts of at most ``max_chars`` characters.

    The first part says who the user is and why they need an agent; the history follows,
    one line per turn, split at turn boundaries (a turn longer than a part is cut).
    """
    header = [OPENING_TITLE]
    who = user.name or "(name not given)"
    if user.email:
        who += f" <{user.email}>"
    header.append(f"User: {who}")
    if user.id:
        header.append(f"User id: {user.id}")
    if user.picture_url:
        header.append(f"Picture: {user.picture_url}")
    for key in sorted(user.attributes):
        header.append(f"{key}: {user.attributes[key]}")
    if title:
        header.append(f"Subject: {title}")
    if description:
        header.append(description)
    lines = ["\n".join(header)]
    if history:
        lines.append("")
        lines.append(HISTORY_TITLE)
        lines.extend(history_line(turn) for turn in history)
    return pack_lines(lines, max_chars)


def history_line(turn: HistoryTurn) -> str:
    who = "User" if turn.role is Role.USER else "Bot"
    if turn.time_ms is not None:
        stamp = dt.datetime.fromtimestamp(turn.time_ms / 1000, tz=dt.UTC).strftime("%H:%M")
        return f"[{stamp}] {who}: {turn.text}"
    return f"{who}: {turn.text}"


def pack_lines(lines: Sequence[str], max_chars: int) -> tuple[str, ...]:
    """Joins lines with newlines into as few parts as fit ``max_chars``; cuts overlong lines."""
    if max_chars < 1:
        raise ValueError("max_chars must be positive")
    parts: list[str] = []
    current = ""
    for line in lines:
        pieces = [line[i : i + max_chars] for i in range(0, len(line), max_chars)] or [""]
        for piece in pieces:
            candidate = f"{current}\n{piece}" if current else piece
            if len(candidate) <= max_chars:
                current = candidate
            else:
                if current.strip():
                    parts.append(current)
                current = piece
    if current.strip():
        parts.append(current)
    return tuple(parts)


def user_message_text(prefix: str, text: str, attachments: Sequence[Attachment]) -> str:
    """A user's message as posted to Brevo: prefixed, with attachments as links."""
    lines = [f"{prefix}{text}"] if text else [prefix.rstrip() or prefix]
    for attachment in attachments:
        label = attachment.name or attachment.url.rsplit("/", 1)[-1] or "file"
        kind = attachment.kind.value.lower()
        mime = f", {attachment.mime_type}" if attachment.mime_type else ""
        lines.append(f"[{kind}{mime}] {label}: {attachment.url}")
    return "\n".join(lines)
