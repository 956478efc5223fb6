"""What the agent reads: the opening message, its parts, relayed user messages."""

from __future__ import annotations

import pytest

from service.core.models import Attachment, AttachmentKind, HistoryTurn, Role, User
from service.core.outbound import opening_parts, pack_lines, user_message_text


def test_opening_with_times_and_without_name() -> None:
    parts = opening_parts(
        user=User(),
        title="",
        description="",
        history=(HistoryTurn(Role.USER, "hello", time_ms=1767225600000),),
        max_chars=4000,
    )
    assert parts == (
        "*New handoff request*\nUser: (name not given)\n\n*Conversation so far*\n"
        "[00:00] User: hello",
    )


def test_pack_lines_splits_at_line_boundaries_and_cuts_overlong_lines() -> None:
    assert pack_lines(["aaa", "bbb", "ccc"], 7) == ("aaa\nbbb", "ccc")
    assert pack_lines(["x" * 10], 4) == ("xxxx", "xxxx", "xx")
    assert pack_lines([], 5) == ()
    with pytest.raises(ValueError, match="positive"):
        pack_lines(["a"], 0)


def test_every_history_line_survives_splitting() -> None:
    history = tuple(HistoryTurn(Role.BOT, f"turn {i}") for i in range(100))
    parts = opening_parts(
        user=User(name="N"), title="T", description="", history=history, max_chars=250
    )
    assert all(len(p) <= 250 for p in parts)
    lines = "\n".join(parts).splitlines()
    assert [line for line in lines if line.startswith("Bot: ")] == [
        f"Bot: turn {i}" for i in range(100)
    ]


def test_user_message_with_attachment_only() -> None:
    text = user_message_text(
        "Botpress User: ",
        "",
        [Attachment(url="https://x/y/report.pdf", kind=AttachmentKind.FILE)],
    )
    assert text == "Botpress User:\n[file] report.pdf: https://x/y/report.pdf"
