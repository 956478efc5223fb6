"""What the fuzzing of test_fuzz.py found, each as the smallest input that shows it.

Each was a real fault, now mended; these tests keep it mended. Each docstring names where
the fault was.

- F1: a lone UTF-16 surrogate (JSON "\\ud800") in an id of a webhook is an HTTP 500;
- F2: a createdAt beyond SQLite's 64-bit integers is an HTTP 500;
- F3, F4, F5: a createdAt outside the years 1-9999, a lone surrogate in a text, a file size
  or image size beyond the proto's integers are acknowledged (200 "stored"), then every
  stream that reaches that event ends INTERNAL, for ever: replay hits it again, and the
  deployment-wide stream is blocked for every client;
- F6: a StartHandoff history time outside the years 1-9999 (or with invalid nanos) is INTERNAL;
- F7: a long unknown handoff_id on StreamAgentReplies is echoed whole in the NOT_FOUND
  message, which then exceeds gRPC's metadata limit: the client gets RESOURCE_EXHAUSTED;
- F8: request bytes that are not the request message are UNKNOWN (and an ERROR log line).
"""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from support import Harness, agent_fragment, fixture

from service.core.models import encode_cursor
from service.rpc.generated.handoff.v1 import handoff_pb2 as pb


@pytest.fixture
def h(sqlite_harness: Harness) -> Harness:
    """The whole service on SQLite (the findings do not depend on the store)."""
    return sqlite_harness


def put(body: dict[str, Any], path: str, value: object) -> None:
    """Sets ``value`` at a dotted path of ``body``; digits index lists."""
    *parents, last = path.split(".")
    target: Any = body
    for step in parents:
        target = target[int(step)] if step.isdigit() else target[step]
    target[last] = value


async def stream_all(h: Harness, handoff_id: str, count: int) -> list[pb.HandoffEvent]:
    """The first ``count`` events of the handoff's stream; fails on a gRPC error."""
    try:
        return await h.collect(handoff_id, count)
    except grpc.aio.AioRpcError as exc:
        raise AssertionError(
            f"the stream of an acknowledged event failed: {exc.code().name} {exc.details()}"
        ) from None


@pytest.mark.parametrize("path", ["visitor.id", "conversationId", "messages.0.id"])
async def test_f1_a_lone_surrogate_in_an_id_is_no_500(h: Harness, path: str) -> None:
    """F1. JSON may escape a lone surrogate ("\\ud800"); json.loads gives a str SQLite cannot
    encode: UnicodeEncodeError (not a sqlite3.Error) escapes SqliteStore._run
    (service/storage/sqlite.py:126) and the gateway answers 500 (gateway/app.py, the
    ``except Exception`` of brevo_webhook). Brevo would retry it for nothing."""
    handoff = await h.start_handoff()
    body = agent_fragment(handoff.visitor_id, "f1-message", "hello")
    put(body, path, "x\ud800")
    response = await h.post(body)  # json.dumps escapes it: the body is valid JSON
    assert response.status_code in (200, 400), (response.status_code, response.text)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("messages.0.createdAt", 2**63),  # F2: a 500 at once
        ("messages.0.createdAt", 10**15),  # F3: year 33658
        ("messages.0.createdAt", -(10**15)),  # F3: before year 1
        ("messages.0.text", "a\ud800b"),  # F4
        ("messages.0.agentName", "\udfff"),  # F4
        ("messages.0.agentId", "agent\udc00"),  # F4
        ("messages.0.file.name", "label\ud800.png"),  # F4
        ("messages.0.file.size", 2**63),  # F5: beyond int64
        ("messages.0.file.imageInfo.width", 2**31),  # F5: beyond int32
        ("messages.0.file.imageInfo.height", 10**12),  # F5
    ],
)
async def test_f2_to_f5_an_acknowledged_event_can_always_be_streamed(
    h: Harness, path: str, value: object
) -> None:
    """F2-F5. brevo_payloads._Reader.number (service/core/brevo_payloads.py:103) returns any
    int unbounded, and _Reader.text any str, lone surrogates included. A createdAt >= 2**63
    overflows SQLite's INTEGER (OverflowError: a 500). Otherwise the event is stored and
    acknowledged, and converting it for a stream fails: a Timestamp cannot carry a time
    outside the years 1-9999 (service/rpc/convert.py, _set_time), protobuf refuses a lone
    surrogate in a string and an int beyond int32/int64 (convert.reply_out). The servicer
    turns that into INTERNAL (service/rpc/servicer.py, StreamAgentReplies) on every attempt:
    the event can never be delivered, nor anything after it."""
    handoff = await h.start_handoff()
    body = fixture("fragment_file.json", handoff.visitor_id)
    put(body, path, value)
    response = await h.post(body)
    assert response.status_code in (200, 400), (response.status_code, response.text)
    answer = response.json()
    if answer.get("outcome") == "stored":
        await stream_all(h, handoff.id, answer["events"])


async def test_f3_one_bad_event_does_not_block_the_deployment_wide_stream(h: Harness) -> None:
    """F3, its reach: one webhook with a createdAt in year 33658 for handoff A, then a normal
    reply in handoff B. A client of the deployment-wide stream (handoff_id empty) must still
    receive B's reply; today it gets INTERNAL at A's event, and again on every reconnect."""
    a = await h.start_handoff("conv-a")
    b = await h.start_handoff("conv-b")
    bad = agent_fragment(a.visitor_id, "a-1", "from the year 33658")
    put(bad, "messages.0.createdAt", 10**15)
    assert (await h.post(bad)).json() == {"outcome": "stored", "events": 2}
    good = await h.post(agent_fragment(b.visitor_id, "b-1", "hello b"))
    assert good.json() == {"outcome": "stored", "events": 2}
    try:
        events = await h.collect("", 4, after_cursor=encode_cursor(0))
    except grpc.aio.AioRpcError as exc:
        raise AssertionError(
            f"the deployment-wide stream failed: {exc.code().name} {exc.details()}"
        ) from None
    assert "hello b" in [e.agent_message.text for e in events]


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(253_402_300_800, 0), (-62_135_596_801, 0), (2**62, 0), (0, -1), (0, 1_000_000_000)],
)
async def test_f6_a_history_time_out_of_range_is_no_internal_error(
    h: Harness, seconds: int, nanos: int
) -> None:
    """F6. convert.start_request (service/rpc/convert.py:61) calls Timestamp.ToMilliseconds,
    which raises ValueError for a time outside the years 1-9999 or nanos outside
    [0, 1e9): INTERNAL. It should be INVALID_ARGUMENT "history[0].time: ..." (or be
    ignored)."""
    turn = pb.HistoryTurn(
        role=pb.ROLE_USER, text="hi", time=Timestamp(seconds=seconds, nanos=nanos)
    )
    code, details = grpc.StatusCode.OK, ""
    try:
        await h.start_handoff("conv-f6", history=[turn])
    except grpc.aio.AioRpcError as exc:
        code, details = exc.code(), exc.details() or ""
    if code != grpc.StatusCode.OK:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
        assert details.startswith("history[0].time"), details


@pytest.mark.parametrize("handoff_id", ["x" * 20_000, "\u00e9" * 10_000])
async def test_f7_a_long_unknown_handoff_id_on_a_stream_gets_a_clean_status(
    h: Harness, handoff_id: str
) -> None:
    """F7. HandoffManager.events (service/core/handoffs.py:427) does not bound handoff_id
    (the unary RPCs do, with _require_id), and _get's NotFound (handoffs.py:502) repeats
    the whole id. A grpc-message over 8 KiB exceeds the client's metadata limit: the client
    sees RESOURCE_EXHAUSTED "received metadata size exceeds soft limit", not the status
    (between the soft and the hard limit, 8 and 16 KiB, only some of the time)."""
    call = h.stub.StreamAgentReplies(pb.StreamAgentRepliesRequest(handoff_id=handoff_id))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    assert caught.value.code() in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
    ), caught.value.details()


@pytest.mark.parametrize(
    "payload",
    [
        b"\x0a\x02\xff\xfe",  # field 1 (handoff_id) holding invalid UTF-8
        b"\xff\xff\xff",  # not protobuf at all
    ],
)
async def test_f8_a_request_that_does_not_parse_is_invalid_argument(
    h: Harness, payload: bytes
) -> None:
    """F8. gRPC Python answers UNKNOWN ("Unexpected <class DecodeError>") and logs an ERROR
    when the request deserializer raises: a client in another language may well send a
    string field holding invalid UTF-8. The contract says INVALID_ARGUMENT for a malformed
    request; UNKNOWN and INTERNAL are reserved for bugs. The servicer never sees the call:
    the fix belongs where the handlers are registered (service/rpc/server.py)."""
    get_handoff: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = h.channel.unary_unary(
        "/handoff.v1.HandoffService/GetHandoff"
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get_handoff(payload)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
