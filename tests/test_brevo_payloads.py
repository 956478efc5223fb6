"""Lenient parsing of webhook bodies: odd types noted and ignored, never fatal."""

from __future__ import annotations

import pytest

from service.core.brevo_payloads import BrevoFile, InvalidPayload, parse_webhook


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ([], "expected a JSON object, got an array"),
        ("x", "expected a JSON object, got a string"),
        (3, "expected a JSON object, got a number"),
        (None, "expected a JSON object, got null"),
        ({}, "eventName is missing or not a string"),
        ({"eventName": ["conversationFragment"]}, "eventName is missing or not a string"),
    ],
)
def test_not_a_webhook(body: object, problem: str) -> None:
    with pytest.raises(InvalidPayload) as caught:
        parse_webhook(body)
    assert caught.value.problem == problem


def test_both_file_spellings_are_read() -> None:
    event = parse_webhook(
        {
            "eventName": "conversationFragment",
            "messages": [
                {
                    "id": "new",
                    "file": {
                        "name": "a.png",
                        "link": "https://l/a.png",
                        "mimeType": "image/png",
                        "size": 5,
                        "isImage": True,
                        "imageInfo": {"width": 2, "height": 3, "previewLink": "https://p"},
                    },
                },
                {
                    "id": "old",
                    "file": {
                        "filename": "b.pdf",
                        "url": "https://l/b.pdf",
                        "size": "7",
                        "imageInfo": {"previewUrl": "https://q"},
                    },
                },
            ],
        }
    )
    assert event.messages[0].files == (
        BrevoFile("a.png", "https://l/a.png", "image/png", 5, True, 2, 3, "https://p"),
    )
    assert event.messages[1].files == (
        BrevoFile("b.pdf", "https://l/b.pdf", "", 7, False, 0, 0, "https://q"),
    )


def test_wrong_types_become_problems_not_failures() -> None:
    event = parse_webhook(
        {
            "eventName": "conversationFragment",
            "conversationId": ["x"],
            "isNoAvailableAgent": "maybe",
            "visitor": {"id": 12},
            "agents": "nobody",
            "messages": [{"id": "m", "text": {"a": 1}, "createdAt": True, "isPushed": "yes"}, 5],
        }
    )
    assert event.conversation_id == ""
    assert event.no_agent_available is None
    assert event.visitor_id == "12"
    assert event.agents == {}
    assert len(event.messages) == 1
    message = event.messages[0]
    assert (message.text, message.created_at_ms, message.is_pushed) == ("", None, False)
    assert len(event.problems) == 7


def test_conversation_started_message_counts_as_the_first_message() -> None:
    event = parse_webhook(
        {"eventName": "conversationStarted", "message": {"id": "first", "type": "visitor"}}
    )
    assert [m.id for m in event.messages] == ["first"]


def test_unknown_events_are_not_read_further() -> None:
    event = parse_webhook({"eventName": "somethingNew", "messages": "whatever"})
    assert event.event_name == "somethingNew"
    assert event.messages == ()
    assert event.problems == ()
