"""Each Brevo fixture through the real gateway, beside the exact events it must produce."""

from __future__ import annotations

import pytest
from support import Harness, agent_fragment, all_summaries, fixture, summarize

from service.rpc.generated.handoff.v1 import handoff_pb2 as pb

MARTA = "HmN3bV7cX2zL9kJ4q"
JON = "Kq8Wd2Rt6Yp1Ls9Mz"

# fixture -> the events it produces on a fresh handoff, in stream order.
GOLDEN: dict[str, list[tuple[object, ...]]] = {
    # The service's own echo is dropped; Marta's reply follows her AgentJoined.
    "fragment_reply_with_echo.json": [
        ("joined", MARTA, "Marta"),
        (
            "message",
            "Rf6TgY5hU4jI3kO2l",
            MARTA,
            "Marta",
            "Sorry to hear that! Could you send a photo of the damage?",
        ),
    ],
    # Sorted by createdAt; visitor line, pushed message and repeated id dropped;
    # the transfer from Marta to Jon gives a second AgentJoined.
    "fragment_batch_unordered.json": [
        ("joined", MARTA, "Marta"),
        (
            "message",
            "Ab1Cd3Ef5Gh7Ij9Kl",
            MARTA,
            "Marta",
            "I am passing you to my colleague Jon from returns.",
        ),
        ("joined", JON, "Jon"),
        (
            "message",
            "Jk2Lm4Np6Qr8St0Uv",
            JON,
            "Jon",
            "Hi, Jon here - Marta handed your case to me.",
        ),
        ("message", "Tu5Vw7Xy9Za1Bc3De", JON, "Jon", "Your replacement ships today."),
    ],
    "fragment_file.json": [
        ("joined", MARTA, "Marta"),
        ("message", "Fl9Gh8Jk7Lm6Np5Qr", MARTA, "Marta", "return-label.png"),
    ],
    # Bare minimum: no agents[], no html, visitor with only an id. Name unknown.
    "fragment_minimal.json": [
        ("joined", MARTA, ""),
        ("message", "Mi1Ni2Ma3Lx4Yz5Ab", MARTA, "", "Are you still there?"),
    ],
    # Only the service's own echo, with isNoAvailableAgent.
    "fragment_no_agent.json": [("no_agent",)],
    # The whole chat: echoes dropped, agent messages recovered in createdAt order, then the end.
    "transcript.json": [
        ("joined", MARTA, "Marta"),
        (
            "message",
            "Rf6TgY5hU4jI3kO2l",
            MARTA,
            "Marta",
            "Sorry to hear that! Could you send a photo of the damage?",
        ),
        ("message", "Fl9Gh8Jk7Lm6Np5Qr", MARTA, "Marta", "return-label.png"),
        (
            "message",
            "Ms9Se8Dm7Ge6Ss5Ag",
            MARTA,
            "Marta",
            "Are you still there? I will close this chat in 5 minutes.",
        ),
        ("ended", "END_REASON_AGENT_CLOSED"),
    ],
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
async def test_fixture_produces_exact_events(harness: Harness, name: str) -> None:
    handoff = await harness.start_handoff()
    await harness.settle()  # the sandbox's own echo of the opening message is in
    response = await harness.post(fixture(name, handoff.visitor_id))
    expected = GOLDEN[name]
    assert response.status_code == 200
    assert response.json() == {"outcome": "stored", "events": len(expected)}
    events = await harness.collect(handoff.id, len(expected))
    assert all_summaries(events) == expected
    assert all(e.handoff_id == handoff.id and e.conversation_id == "conv-1" for e in events)
    cursors = [e.cursor for e in events]
    assert len(set(cursors)) == len(cursors)


async def test_file_becomes_an_attachment_with_link_name_type_and_size(harness: Harness) -> None:
    handoff = await harness.start_handoff()
    await harness.settle()
    await harness.post(fixture("fragment_file.json", handoff.visitor_id))
    _, message = await harness.collect(handoff.id, 2)
    (attachment,) = message.agent_message.attachments
    assert attachment.url == "https://files.example.net/u/3a9b7c/return-label.png"
    assert attachment.name == "return-label.png"
    assert attachment.mime_type == "image/png"
    assert attachment.kind == 1  # ATTACHMENT_KIND_IMAGE
    assert attachment.size_bytes == 48213
    assert (attachment.width, attachment.height) == (800, 1131)
    assert attachment.preview_url == "https://files.example.net/u/3a9b7c/-/preview/800x800/"
    assert message.agent_message.agent.picture_url == "https://cdn.example.net/userpics/marta.png"
    assert message.occurred_at.ToMilliseconds() == 1767225960000


async def test_fixtures_in_sequence_recover_a_lost_message_and_never_repeat(
    harness: Harness,
) -> None:
    handoff = await harness.start_handoff()
    await harness.settle()
    visitor = handoff.visitor_id
    for name in ("fragment_reply_with_echo.json", "fragment_file.json"):
        assert (await harness.post(fixture(name, visitor))).status_code == 200
    # The same fragment again (a redelivery): acknowledged, nothing new.
    again = await harness.post(fixture("fragment_reply_with_echo.json", visitor))
    assert again.json() == {"outcome": "duplicate", "events": 0}
    # The minimal fragment is lost on its way; the transcript recovers the missed message.
    await harness.post(fixture("transcript.json", visitor))
    events = await harness.collect(handoff.id, 5)
    # Exactly what the transcript alone gives: nothing twice, the lost message recovered.
    assert all_summaries(events) == GOLDEN["transcript.json"]
    got = await harness.running.manager.get(handoff.id)
    assert got.state.value == "ENDED"
    assert got.brevo_conversation_id == "Mn4Bv6Cx8Za0Sd2Fg"


async def test_a_redelivery_with_stale_flags_adds_nothing_and_moves_nothing(
    harness: Harness,
) -> None:
    handoff = await harness.start_handoff()
    await harness.settle()
    reply = fixture("fragment_reply_with_echo.json", handoff.visitor_id)
    assert (await harness.post(reply)).json() == {"outcome": "stored", "events": 2}
    # Redelivered as if produced while nobody was online, naming another chat: the
    # messages are known, so the flags are as old as they are.
    stale = {**reply, "isNoAvailableAgent": True, "conversationId": "Zq7OlderChat01"}
    assert (await harness.post(stale)).json() == {"outcome": "duplicate", "events": 0}
    got = await harness.stub.GetHandoff(pb.GetHandoffRequest(handoff_id=handoff.id))
    assert got.handoff.brevo_conversation_id == "Mn4Bv6Cx8Za0Sd2Fg"
    assert got.handoff.state == pb.HANDOFF_STATE_ACTIVE
    # The next event after the reply is the next new message: nothing came in between.
    marker = agent_fragment(handoff.visitor_id, "Mk1NextMessage", "next", n=60_000)
    assert (await harness.post(marker)).json() == {"outcome": "stored", "events": 1}
    events = await harness.collect(handoff.id, 3)
    assert all_summaries(events) == [
        *GOLDEN["fragment_reply_with_echo.json"],
        ("message", "Mk1NextMessage", MARTA, "Marta", "next"),
    ]


async def test_no_agent_available_is_emitted_once_per_change(harness: Harness) -> None:
    handoff = await harness.start_handoff()
    await harness.settle()  # the sandbox's own deliveries carry isNoAvailableAgent too
    body = fixture("fragment_no_agent.json", handoff.visitor_id)
    assert (await harness.post(body)).json()["events"] == 1
    # Still no agent: no second event.
    assert (await harness.post(body)).json() == {"outcome": "duplicate", "events": 0}
    # Agents come back (flag false), then leave again: a new NoAgentAvailable.
    back = {**body, "isNoAvailableAgent": False, "messages": []}
    assert (await harness.post(back)).status_code == 200
    gone = {**body, "isNoAvailableAgent": True, "messages": []}
    assert (await harness.post(gone)).json()["events"] == 1
    events = await harness.collect(handoff.id, 2)
    assert all_summaries(events) == [("no_agent",), ("no_agent",)]


async def test_conversation_started_for_a_website_visitor_is_acknowledged_and_dropped(
    harness: Harness,
) -> None:
    before = harness.running.manager.stats["webhooks_unknown_visitor"]
    response = await harness.post(fixture("conversation_started.json"))
    assert response.status_code == 200
    assert response.json() == {"outcome": "unknown_visitor", "events": 0}
    assert harness.running.manager.stats["webhooks_unknown_visitor"] == before + 1


async def test_conversation_started_for_our_visitor_notes_the_brevo_conversation(
    harness: Harness,
) -> None:
    handoff = await harness.start_handoff()
    await harness.settle()
    body = fixture("conversation_started.json", handoff.visitor_id)
    response = await harness.post(body)
    assert response.status_code == 200
    # Its message is a visitor's line: nothing to stream, but isNoAvailableAgent is.
    events = await harness.collect(handoff.id, 1)
    assert summarize(events[0]) == ("no_agent",)
    got = await harness.running.manager.get(handoff.id)
    assert got.brevo_conversation_id == "Qw7RtY2uIo9PaSdFg"


async def test_a_fragment_without_visitor_is_routed_by_its_conversation_id(
    harness: Harness,
) -> None:
    handoff = await harness.start_handoff()
    await harness.settle()
    await harness.post(fixture("fragment_reply_with_echo.json", handoff.visitor_id))
    body = fixture("fragment_minimal.json")
    del body["visitor"]
    response = await harness.post(body)
    assert response.json() == {"outcome": "stored", "events": 1}
    events = await harness.collect(handoff.id, 3)
    assert summarize(events[2]) == (
        "message",
        "Mi1Ni2Ma3Lx4Yz5Ab",
        MARTA,
        "Marta",
        "Are you still there?",
    )


async def test_dropped_messages_are_counted_by_reason(harness: Harness) -> None:
    handoff = await harness.start_handoff()
    await harness.settle()
    stats = harness.running.manager.stats
    before = {k: stats[f"messages_dropped_{k}"] for k in ("visitor", "pushed", "duplicate")}
    await harness.post(fixture("fragment_batch_unordered.json", handoff.visitor_id))
    after = {k: stats[f"messages_dropped_{k}"] for k in ("visitor", "pushed", "duplicate")}
    assert {k: after[k] - before[k] for k in after} == {"visitor": 1, "pushed": 1, "duplicate": 1}
