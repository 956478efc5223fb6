"""Every RPC over a real gRPC channel: results, idempotency and the exact status codes."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import grpc
import pytest
from support import Harness, all_summaries, close_harness, make_config, open_harness

from service.brevo.sandbox import Fault
from service.rpc.generated.handoff.v1 import handoff_pb2 as pb


def texts(harness: Harness, visitor_id: str) -> list[str]:
    return [str(m["text"]) for m in harness.sandbox.messages(visitor_id)]


async def rpc_error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


def test_wire_names_are_the_proto_package() -> None:
    service = pb.DESCRIPTOR.services_by_name["HandoffService"]
    assert service.full_name == "handoff.v1.HandoffService"
    assert sorted(m.name for m in service.methods) == [
        "GetHandoff",
        "SendMessage",
        "StartHandoff",
        "StopHandoff",
        "StreamAgentReplies",
    ]


async def test_the_server_answers_on_the_wire_path_other_languages_call(
    harness: Harness,
) -> None:
    # Stubs in Node, Go or Java call the path from the proto, not from our Python modules:
    # a raw call on that literal path must reach the servicer.
    handoff = await harness.start_handoff()
    get = harness.channel.unary_unary(
        "/handoff.v1.HandoffService/GetHandoff",
        request_serializer=pb.GetHandoffRequest.SerializeToString,
        response_deserializer=pb.GetHandoffResponse.FromString,
    )
    response = await get(pb.GetHandoffRequest(handoff_id=handoff.id))
    assert response.handoff.id == handoff.id
    wrong = harness.channel.unary_unary(
        "/service.rpc.generated.handoff.v1.HandoffService/GetHandoff",
        request_serializer=pb.GetHandoffRequest.SerializeToString,
        response_deserializer=pb.GetHandoffResponse.FromString,
    )
    error = await rpc_error(wrong(pb.GetHandoffRequest(handoff_id=handoff.id)))
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_start_handoff_posts_the_opening_message(harness: Harness) -> None:
    response = await harness.stub.StartHandoff(
        pb.StartHandoffRequest(
            conversation_id="bot-conv-7",
            user=pb.User(
                id="u-1", name="Ada L.", email="ada@example.org", attributes={"plan": "gold"}
            ),
            title="Damaged order",
            description="Order #1042 arrived damaged.",
            history=[
                pb.HistoryTurn(role=pb.ROLE_USER, text="my order arrived damaged"),
                pb.HistoryTurn(role=pb.ROLE_BOT, text="I am getting you a human."),
            ],
            metadata={"channel": "web"},
        )
    )
    handoff = response.handoff
    assert response.created is True
    assert handoff.conversation_id == "bot-conv-7"
    assert handoff.state == pb.HANDOFF_STATE_PENDING_AGENT
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", handoff.visitor_id)
    assert dict(handoff.metadata) == {"channel": "web"}
    assert handoff.created_at.ToMilliseconds() > 0
    assert texts(harness, handoff.visitor_id) == [
        "*New handoff request*\n"
        "User: Ada L. <ada@example.org>\n"
        "User id: u-1\n"
        "plan: gold\n"
        "Subject: Damaged order\n"
        "Order #1042 arrived damaged.\n"
        "\n"
        "*Conversation so far*\n"
        "User: my order arrived damaged\n"
        "Bot: I am getting you a human."
    ]
    posted = harness.sandbox.messages(handoff.visitor_id)[0]
    assert posted["agentId"] == "Bridg3AgentId0001"
    assert posted["receivedFrom"] == "handoff-service"


async def test_start_handoff_is_idempotent_per_open_conversation(harness: Harness) -> None:
    first = await harness.stub.StartHandoff(pb.StartHandoffRequest(conversation_id="c"))
    second = await harness.stub.StartHandoff(pb.StartHandoffRequest(conversation_id="c"))
    assert second.created is False
    assert second.handoff.id == first.handoff.id
    assert len(harness.sandbox.messages(first.handoff.visitor_id)) == 1
    # Concurrent first calls for another conversation: one handoff, one opening message.
    results = await asyncio.gather(
        *[harness.stub.StartHandoff(pb.StartHandoffRequest(conversation_id="d")) for _ in range(5)]
    )
    assert len({r.handoff.id for r in results}) == 1
    assert sum(r.created for r in results) == 1
    assert len(harness.sandbox.messages(results[0].handoff.visitor_id)) == 1
    # Once ended, the same conversation gets a new handoff with a new visitor.
    await harness.stub.StopHandoff(pb.StopHandoffRequest(handoff_id=first.handoff.id))
    third = await harness.stub.StartHandoff(pb.StartHandoffRequest(conversation_id="c"))
    assert third.created is True
    assert third.handoff.id != first.handoff.id
    assert third.handoff.visitor_id != first.handoff.visitor_id


async def test_long_opening_is_split_in_order(tmp_path: Path) -> None:
    h = await open_harness(make_config(tmp_path, "--opening-max-chars", "200"))
    try:
        history = [
            pb.HistoryTurn(role=pb.ROLE_USER, text=f"line {i} " + "x" * 60) for i in range(8)
        ]
        handoff = await h.start_handoff(history=history)
        parts = texts(h, handoff.visitor_id)
        assert len(parts) > 1
        assert all(len(p) <= 200 for p in parts)
        joined = "\n".join(parts)
        assert [joined.index(f"line {i} ") for i in range(8)] == sorted(
            joined.index(f"line {i} ") for i in range(8)
        )
        assert parts[0].startswith("*New handoff request*")
    finally:
        await close_harness(h)


async def test_send_message_relays_with_prefix_and_links(harness: Harness) -> None:
    handoff = await harness.start_handoff()
    response = await harness.stub.SendMessage(
        pb.SendMessageRequest(
            handoff_id=handoff.id,
            client_message_id="m-1",
            text="here is the photo",
            attachments=[
                pb.Attachment(
                    url="https://files.example.org/a/damage.jpg",
                    name="damage.jpg",
                    mime_type="image/jpeg",
                    kind=pb.ATTACHMENT_KIND_IMAGE,
                )
            ],
        )
    )
    messages = harness.sandbox.messages(handoff.visitor_id)
    assert messages[-1]["id"] == response.brevo_message_id
    assert response.duplicate is False
    assert messages[-1]["text"] == (
        "Botpress User: here is the photo\n"
        "[image, image/jpeg] damage.jpg: https://files.example.org/a/damage.jpg"
    )
    assert messages[-1]["receivedFrom"] == "handoff-service"


async def test_send_message_retry_with_same_key_posts_once(harness: Harness) -> None:
    handoff = await harness.start_handoff()
    request = pb.SendMessageRequest(handoff_id=handoff.id, client_message_id="k", text="hello")
    first = await harness.stub.SendMessage(request)
    again = await harness.stub.SendMessage(request)
    assert again.brevo_message_id == first.brevo_message_id
    assert again.duplicate is True
    assert texts(harness, handoff.visitor_id).count("Botpress User: hello") == 1


async def test_brevo_429_then_500_then_200_delivers_once(harness: Harness) -> None:
    handoff = await harness.start_handoff()
    harness.sandbox.inject_faults(
        Fault(status=429, headers={"x-sib-ratelimit-reset": "0"}), Fault(status=500)
    )
    response = await harness.stub.SendMessage(
        pb.SendMessageRequest(handoff_id=handoff.id, client_message_id="r", text="retry me")
    )
    assert texts(harness, handoff.visitor_id).count("Botpress User: retry me") == 1
    assert harness.sandbox.messages(handoff.visitor_id)[-1]["id"] == response.brevo_message_id
    statuses = [status for method, _, status in harness.sandbox.rest_calls if method == "POST"]
    assert statuses[-3:] == [429, 500, 200]


@pytest.mark.parametrize(
    ("faults", "code", "words"),
    [
        ([Fault(status=500)] * 4, grpc.StatusCode.UNAVAILABLE, "Brevo"),
        ([Fault(status=503)] * 4, grpc.StatusCode.UNAVAILABLE, "Brevo"),
        (
            [Fault(status=429, headers={"x-sib-ratelimit-reset": "0"})] * 4,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "rate",
        ),
        (
            [Fault(status=429, headers={"x-sib-ratelimit-reset": "3600"})],
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "3600",
        ),
        ([Fault(status=401)], grpc.StatusCode.FAILED_PRECONDITION, "key"),
        (
            [
                Fault(
                    status=401,
                    body={
                        "code": "unauthorized",
                        "message": "We have detected you are using an unrecognised IP address",
                    },
                )
            ],
            grpc.StatusCode.FAILED_PRECONDITION,
            "IP",
        ),
        (
            [Fault(status=400, body={"code": "invalid_parameter", "message": "text is too long"})],
            grpc.StatusCode.INVALID_ARGUMENT,
            "text is too long",
        ),
    ],
)
async def test_brevo_failures_map_to_status_codes(
    harness: Harness, faults: list[Fault], code: grpc.StatusCode, words: str
) -> None:
    handoff = await harness.start_handoff()
    harness.sandbox.inject_faults(*faults)
    error = await rpc_error(
        harness.stub.SendMessage(
            pb.SendMessageRequest(handoff_id=handoff.id, client_message_id="x", text="hi")
        )
    )
    assert error.code() == code
    assert words.lower() in (error.details() or "").lower()
    # Nothing was recorded: the same key, retried once Brevo is fine, posts the message.
    ok = await harness.stub.SendMessage(
        pb.SendMessageRequest(handoff_id=handoff.id, client_message_id="x", text="hi")
    )
    assert ok.duplicate is False
    assert texts(harness, handoff.visitor_id).count("Botpress User: hi") == 1


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"client_message_id": "a", "text": "hi"}, "handoff_id"),
        ({"handoff_id": "HANDOFF", "text": "hi"}, "client_message_id"),
        ({"handoff_id": "HANDOFF", "client_message_id": "a"}, "text"),
        ({"handoff_id": "HANDOFF", "client_message_id": "a", "text": "   "}, "text"),
        ({"handoff_id": "HANDOFF", "client_message_id": "a", "text": "x" * 10_001}, "text"),
        (
            {
                "handoff_id": "HANDOFF",
                "client_message_id": "a",
                "attachments": [pb.Attachment(url="ftp://x/y")],
            },
            "attachments[0].url",
        ),
        (
            {
                "handoff_id": "HANDOFF",
                "client_message_id": "a",
                "attachments": [pb.Attachment(name="no link")],
            },
            "attachments[0].url",
        ),
    ],
)
async def test_send_message_invalid_arguments_name_the_field(
    harness: Harness, request_fields: dict[str, object], field: str
) -> None:
    handoff = await harness.start_handoff()
    fields = {k: (handoff.id if v == "HANDOFF" else v) for k, v in request_fields.items()}
    error = await rpc_error(harness.stub.SendMessage(pb.SendMessageRequest(**fields)))  # type: ignore[arg-type]
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith(f"{field}:")
    assert len(harness.sandbox.messages(handoff.visitor_id)) == 1  # the opening only


async def test_unknown_and_ended_handoffs(harness: Harness) -> None:
    for call in (
        harness.stub.SendMessage(
            pb.SendMessageRequest(handoff_id="ho_nope", client_message_id="a", text="x")
        ),
        harness.stub.GetHandoff(pb.GetHandoffRequest(handoff_id="ho_nope")),
        harness.stub.StopHandoff(pb.StopHandoffRequest(handoff_id="ho_nope")),
    ):
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND
        assert "ho_nope" in (error.details() or "")
    stream_error = await rpc_error(
        harness.collect("ho_nope", 1)  # the stream fails before its first event
    )
    assert stream_error.code() == grpc.StatusCode.NOT_FOUND
    for empty in (
        harness.stub.GetHandoff(pb.GetHandoffRequest()),
        harness.stub.StopHandoff(pb.StopHandoffRequest()),
        harness.stub.StartHandoff(pb.StartHandoffRequest()),
    ):
        error = await rpc_error(empty)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    handoff = await harness.start_handoff()
    await harness.stub.StopHandoff(pb.StopHandoffRequest(handoff_id=handoff.id))
    error = await rpc_error(
        harness.stub.SendMessage(
            pb.SendMessageRequest(handoff_id=handoff.id, client_message_id="late", text="x")
        )
    )
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "StartHandoff" in (error.details() or "")


async def test_a_cursor_the_log_does_not_hold_is_out_of_range(harness: Harness) -> None:
    handoff = await harness.start_handoff()
    error = await rpc_error(harness.collect(handoff.id, 1, after_cursor="c1.424242"))
    assert error.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "reconnect without after_cursor" in (error.details() or "")


async def test_history_role_must_be_given(harness: Harness) -> None:
    error = await rpc_error(
        harness.stub.StartHandoff(
            pb.StartHandoffRequest(conversation_id="c", history=[pb.HistoryTurn(text="hi")])
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (error.details() or "").startswith("history[0].role:")


async def test_stop_handoff_posts_notice_ends_and_is_idempotent(harness: Harness) -> None:
    handoff = await harness.start_handoff()
    stopped = await harness.stub.StopHandoff(pb.StopHandoffRequest(handoff_id=handoff.id))
    assert stopped.handoff.state == pb.HANDOFF_STATE_ENDED
    assert stopped.handoff.end_reason == pb.END_REASON_STOPPED_BY_BOT
    again = await harness.stub.StopHandoff(
        pb.StopHandoffRequest(handoff_id=handoff.id, notice="ignored")
    )
    assert again.handoff.state == pb.HANDOFF_STATE_ENDED
    assert texts(harness, handoff.visitor_id)[1:] == [
        "The bot has ended this conversation; the user is no longer connected."
    ]
    events = await harness.collect(handoff.id, 1)
    assert all_summaries(events) == [("ended", "END_REASON_STOPPED_BY_BOT")]
    got = await harness.stub.GetHandoff(pb.GetHandoffRequest(handoff_id=handoff.id))
    assert got.handoff == stopped.handoff


async def test_stop_handoff_with_custom_notice_and_brevo_down(harness: Harness) -> None:
    handoff = await harness.start_handoff()
    harness.sandbox.inject_faults(*[Fault(status=502)] * 4)
    error = await rpc_error(harness.stub.StopHandoff(pb.StopHandoffRequest(handoff_id=handoff.id)))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    still = await harness.stub.GetHandoff(pb.GetHandoffRequest(handoff_id=handoff.id))
    assert still.handoff.state == pb.HANDOFF_STATE_PENDING_AGENT
    await harness.stub.StopHandoff(pb.StopHandoffRequest(handoff_id=handoff.id, notice="Bye!"))
    assert texts(harness, handoff.visitor_id)[-1] == "Bye!"


async def test_agent_timeout_ends_the_handoff_and_tells_the_agent(
    tmp_path: Path, store_flags: tuple[str, ...]
) -> None:
    h = await open_harness(make_config(tmp_path, "--agent-timeout-seconds", "0.3", *store_flags))
    try:
        handoff = await h.start_handoff()
        events = await h.collect(handoff.id, 1, timeout_s=10)
        assert all_summaries(events) == [("ended", "END_REASON_TIMED_OUT")]
        assert texts(h, handoff.visitor_id)[-1].startswith("No agent answered in time")
        got = await h.stub.GetHandoff(pb.GetHandoffRequest(handoff_id=handoff.id))
        assert got.handoff.end_reason == pb.END_REASON_TIMED_OUT
    finally:
        await close_harness(h)


async def test_an_answered_handoff_does_not_time_out(
    tmp_path: Path, store_flags: tuple[str, ...]
) -> None:
    # Long enough for the agent's answer to be stored first even on a loaded machine.
    h = await open_harness(make_config(tmp_path, "--agent-timeout-seconds", "1", *store_flags))
    try:
        handoff = await h.start_handoff()
        await h.sandbox.agent_says(handoff.visitor_id, "I'm here")
        await h.settle()
        await asyncio.sleep(1.5)  # past the timeout
        got = await h.stub.GetHandoff(pb.GetHandoffRequest(handoff_id=handoff.id))
        assert got.handoff.state == pb.HANDOFF_STATE_ACTIVE
    finally:
        await close_harness(h)


async def test_idle_stream_gets_heartbeats(tmp_path: Path) -> None:
    h = await open_harness(make_config(tmp_path, "--heartbeat-seconds", "0.1"))
    try:
        handoff = await h.start_handoff()
        await h.settle()
        call = h.stub.StreamAgentReplies(pb.StreamAgentRepliesRequest(handoff_id=handoff.id))
        kinds = []
        async for item in call:
            kinds.append(item.WhichOneof("item"))
            if len(kinds) == 2:
                break
        call.cancel()
        assert kinds == ["heartbeat", "heartbeat"]
    finally:
        await close_harness(h)


async def test_a_cursor_that_is_not_ours_is_an_invalid_argument(harness: Harness) -> None:
    handoff = await harness.start_handoff()
    for cursor in ("garbage", "c1.-5", "c1.12ab"):
        error = await rpc_error(harness.collect(handoff.id, 1, after_cursor=cursor))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (error.details() or "").startswith("after_cursor:")


async def test_an_opening_that_failed_is_finished_by_retrying_start_handoff(
    harness: Harness,
) -> None:
    harness.sandbox.inject_faults(*[Fault(status=500)] * 4)
    error = await rpc_error(harness.stub.StartHandoff(pb.StartHandoffRequest(conversation_id="o")))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    # The handoff exists but the agent has not been told: sending is refused until it is.
    handoff = await harness.running.store.find_open_by_conversation("o")
    assert handoff is not None
    assert harness.sandbox.messages(handoff.visitor_id) == []
    refused = await rpc_error(
        harness.stub.SendMessage(
            pb.SendMessageRequest(handoff_id=handoff.id, client_message_id="1", text="hi")
        )
    )
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "StartHandoff" in (refused.details() or "")
    retried = await harness.stub.StartHandoff(pb.StartHandoffRequest(conversation_id="o"))
    assert (retried.handoff.id, retried.created) == (handoff.id, False)
    assert texts(harness, handoff.visitor_id) == ["*New handoff request*\nUser: (name not given)"]
    await harness.stub.SendMessage(
        pb.SendMessageRequest(handoff_id=handoff.id, client_message_id="1", text="hi")
    )
    assert texts(harness, handoff.visitor_id)[-1] == "Botpress User: hi"
