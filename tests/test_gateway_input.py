"""Bad webhook input gets a clear 4xx, never a 5xx, and the service keeps serving."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from support import Harness, agent_fragment, all_summaries, fixture

MARTA = "HmN3bV7cX2zL9kJ4q"


async def stored_event_count(h: Harness) -> int:
    return await h.running.store.last_seq()


async def test_wrong_token_is_404_and_stores_nothing(harness: Harness) -> None:
    handoff = await harness.start_handoff()
    await harness.settle()
    before = await stored_event_count(harness)
    token = harness.running.config.webhook_token.reveal()
    for wrong in (
        "nope",
        token[:-1],
        token + "x",
        token.upper() if token.upper() != token else "A",
    ):
        response = await harness.post(
            fixture("fragment_reply_with_echo.json", handoff.visitor_id), token=wrong
        )
        assert response.status_code == 404
        assert response.json() == {"error": "not found"}
    assert await stored_event_count(harness) == before


async def test_paths_beside_the_webhook_get_routing_answers_and_store_nothing(
    harness: Harness,
) -> None:
    """The webhook POST skips Starlette's router; every other request still goes through it."""
    handoff = await harness.start_handoff()
    await harness.settle()
    before = await stored_event_count(harness)
    token = harness.running.config.webhook_token.reveal()
    body = json.dumps(agent_fragment(handoff.visitor_id, "beside-1", "are you there?"))
    base = harness.webhook_url.removesuffix(token)
    for method, url, status in (
        ("GET", harness.webhook_url, 405),
        ("PUT", harness.webhook_url, 405),
        ("POST", f"{harness.webhook_url}/extra", 404),
        ("POST", f"{base}{token}/", 307),  # Starlette's redirect to the path without it
        ("POST", base, 404),
        ("POST", base.removesuffix("/"), 404),
    ):
        response = await harness.http.request(method, url, content=body)
        assert (method, url.removeprefix(base), response.status_code) == (
            method,
            url.removeprefix(base),
            status,
        )
    assert await stored_event_count(harness) == before
    response = await harness.http.post(harness.webhook_url, content=body)
    assert response.status_code == 200
    # The agent joined, and their message: the same body, now at the webhook's own path.
    assert response.json() == {"outcome": "stored", "events": 2}
    assert await stored_event_count(harness) == before + 2


async def test_json_the_fast_decoder_refuses_is_still_read(harness: Harness) -> None:
    """The gateway decodes with orjson and falls back to the standard library: a lone
    surrogate escape (which orjson refuses) still arrives, as '?'."""
    handoff = await harness.start_handoff()
    await harness.settle()
    body = json.dumps(agent_fragment(handoff.visitor_id, "surrogate-1", "PLACEHOLDER"))
    response = await harness.post(body.replace("PLACEHOLDER", "half \\ud800 a pair").encode())
    assert response.json() == {"outcome": "stored", "events": 2}
    events = await harness.collect(handoff.id, 2)
    assert all_summaries(events) == [
        ("joined", MARTA, ""),
        ("message", "surrogate-1", MARTA, "", "half ? a pair"),
    ]


async def test_oversized_body_is_413(harness: Harness) -> None:
    limit = harness.running.config.webhook_max_bytes
    body = b'{"eventName":"conversationFragment","pad":"' + b"x" * limit + b'"}'
    response = await harness.post(body)
    assert response.status_code == 413
    assert response.json() == {"error": f"body larger than {limit} bytes"}


async def test_oversized_body_without_content_length_is_413(harness: Harness) -> None:
    limit = harness.running.config.webhook_max_bytes

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(limit // 65536 + 2):
            yield b"x" * 65536

    response = await harness.http.post(harness.webhook_url, content=chunks())
    assert response.status_code == 413


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "body is not valid JSON"),
        (b"{not json", "body is not valid JSON"),
        (b"\xff\xfe\x00garbage", "body is not valid JSON"),
        (b"[1, 2, 3]", "expected a JSON object, got an array"),
        (b'"conversationFragment"', "expected a JSON object, got a string"),
        (b"null", "expected a JSON object, got null"),
        (b"{}", "eventName is missing or not a string"),
        (b'{"eventName": 42}', "eventName is missing or not a string"),
        (b'{"eventName": ""}', "eventName is missing or not a string"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
async def test_not_a_webhook_is_400_with_a_one_line_reason(
    harness: Harness, body: bytes, reason: str
) -> None:
    response = await harness.post(body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert reason in error
    assert "\n" not in error


async def test_unknown_event_name_is_acknowledged_and_ignored(harness: Harness) -> None:
    response = await harness.post({"eventName": "conversationRated", "rating": 5})
    assert response.status_code == 200
    assert response.json() == {"outcome": "ignored_event", "events": 0}


WRONG_VALUES: list[object] = [None, 0, -1, 1.5, True, "", "text", [], [1], {}, {"a": 1}]
FIELDS = [
    "conversationId",
    "isNoAvailableAgent",
    "messages",
    "agents",
    "visitor",
]
MESSAGE_FIELDS = [
    "id",
    "type",
    "text",
    "html",
    "createdAt",
    "agentId",
    "agentName",
    "agentUserpic",
    "receivedFrom",
    "isPushed",
    "isTrigger",
    "file",
    "attachments",
]


async def test_wrong_types_in_every_field_never_give_a_5xx(harness: Harness) -> None:
    handoff = await harness.start_handoff()
    await harness.settle()
    base = fixture("fragment_file.json", handoff.visitor_id)
    statuses: set[int] = set()
    for name in ("conversationFragment", "conversationTranscript", "conversationStarted"):
        for key in FIELDS:
            for value in WRONG_VALUES:
                body = {**json.loads(json.dumps(base)), "eventName": name, key: value}
                statuses.add((await harness.post(body)).status_code)
        for key in MESSAGE_FIELDS:
            for value in WRONG_VALUES:
                body = json.loads(json.dumps(base))
                body["eventName"] = name
                body["messages"][0][key] = value
                if name == "conversationStarted":
                    body["message"] = body["messages"][0]
                statuses.add((await harness.post(body)).status_code)
        for key in ("name", "size", "mimeType", "link", "isImage", "imageInfo"):
            for value in WRONG_VALUES:
                body = json.loads(json.dumps(base))
                body["eventName"] = name
                body["messages"][0]["file"][key] = value
                statuses.add((await harness.post(body)).status_code)
    assert statuses == {200}
    # Still serving: a normal reply to a fresh handoff streams as usual.
    fresh = await harness.start_handoff("after-the-storm")
    await harness.settle()
    ok = await harness.post(fixture("fragment_reply_with_echo.json", fresh.visitor_id))
    assert ok.json() == {"outcome": "stored", "events": 2}
    events = await harness.collect(fresh.id, 2)
    assert all_summaries(events)[0] == ("joined", MARTA, "Marta")


async def test_a_missing_visitor_field_never_drops_an_agents_reply(harness: Harness) -> None:
    handoff = await harness.start_handoff()
    await harness.settle()
    # Brevo names the conversation first (routing by visitor), then omits the visitor.
    await harness.post(fixture("fragment_no_agent.json", handoff.visitor_id))
    body = fixture("fragment_minimal.json")
    body["visitor"] = None
    response = await harness.post(body)
    assert response.json() == {"outcome": "stored", "events": 2}
    events = await harness.collect(handoff.id, 3)
    assert all_summaries(events)[1:] == [
        ("joined", MARTA, ""),
        ("message", "Mi1Ni2Ma3Lx4Yz5Ab", MARTA, "", "Are you still there?"),
    ]


async def test_messages_without_id_or_createdat_are_kept_and_deduplicated(
    harness: Harness,
) -> None:
    handoff = await harness.start_handoff()
    await harness.settle()
    body = {
        "eventName": "conversationFragment",
        "visitor": {"id": handoff.visitor_id},
        "messages": [
            {"type": "agent", "agentId": MARTA, "agentName": "Marta", "text": "no id"},
            "not a message",
            {"type": "agent", "agentId": MARTA, "text": "string time", "createdAt": "5", "id": 7},
        ],
    }
    first = await harness.post(body)
    assert first.json() == {"outcome": "stored", "events": 3}
    second = await harness.post(body)
    assert second.json() == {"outcome": "duplicate", "events": 0}
    events = await harness.collect(handoff.id, 3)
    # createdAt "5" sorts before the message that has none (counted as now).
    assert [s[4] for s in all_summaries(events)[1:]] == ["string time", "no id"]
    assert events[1].agent_message.brevo_message_id == "7"


async def test_readiness_follows_the_store_and_liveness_does_not(harness: Harness) -> None:
    base = harness.webhook_url.split("/webhooks/")[0]
    ready = await harness.http.get(f"{base}/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})
    await harness.running.store.close()  # the store is gone (stop() closes it again, harmlessly)
    gone = await harness.http.get(f"{base}/readyz")
    assert (gone.status_code, gone.json()) == (
        503,
        {"status": "unavailable", "reason": "the store is closed"},
    )
    alive = await harness.http.get(f"{base}/healthz")
    assert (alive.status_code, alive.json()) == (200, {"status": "ok"})
