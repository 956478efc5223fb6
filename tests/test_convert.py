"""The stream's items, built in place by service.rpc.convert, against the same messages
spelled out field by field with protobuf's constructors."""

from __future__ import annotations

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from service.core.models import (
    Agent,
    AgentJoined,
    AgentMessage,
    Attachment,
    AttachmentKind,
    EndReason,
    EventPayload,
    HandoffEnded,
    NoAgentAvailable,
    StoredEvent,
)
from service.rpc import convert
from service.rpc.generated.handoff.v1 import handoff_pb2 as pb

MARTA = Agent("agent-7", "Marta", "https://cdn.example.net/marta.png")
PB_MARTA = pb.Agent(id="agent-7", name="Marta", picture_url="https://cdn.example.net/marta.png")
AT_MS = 1_767_225_960_123


def stored(payload: EventPayload, occurred_at_ms: int = AT_MS) -> StoredEvent:
    return StoredEvent(41, "ho_1", "conv-1", occurred_at_ms, payload, received_at_ms=AT_MS)


def expected(**payload: object) -> pb.StreamAgentRepliesResponse:
    return pb.StreamAgentRepliesResponse(
        event=pb.HandoffEvent(
            cursor="c1.41",
            handoff_id="ho_1",
            conversation_id="conv-1",
            occurred_at=Timestamp(seconds=1_767_225_960, nanos=123_000_000),
            **payload,  # type: ignore[arg-type]
        )
    )


def test_an_agent_message_with_its_attachments() -> None:
    photo = Attachment(
        url="https://files.example.net/a.png",
        name="a.png",
        mime_type="image/png",
        kind=AttachmentKind.IMAGE,
        size_bytes=48_213,
        width=800,
        height=1_131,
        preview_url="https://files.example.net/a-preview.png",
    )
    sheet = Attachment(url="https://files.example.net/b.pdf")
    message = AgentMessage("m-1", MARTA, "Here you are", "<p>Here you are</p>", (photo, sheet))
    assert convert.reply_out(stored(message)) == expected(
        agent_message=pb.AgentMessage(
            brevo_message_id="m-1",
            agent=PB_MARTA,
            text="Here you are",
            html="<p>Here you are</p>",
            attachments=[
                pb.Attachment(
                    url="https://files.example.net/a.png",
                    name="a.png",
                    mime_type="image/png",
                    kind=pb.ATTACHMENT_KIND_IMAGE,
                    size_bytes=48_213,
                    width=800,
                    height=1_131,
                    preview_url="https://files.example.net/a-preview.png",
                ),
                pb.Attachment(url="https://files.example.net/b.pdf", kind=pb.ATTACHMENT_KIND_FILE),
            ],
        )
    )


def test_the_status_events() -> None:
    assert convert.reply_out(stored(AgentJoined(MARTA))) == expected(
        agent_joined=pb.AgentJoined(agent=PB_MARTA)
    )
    empty = convert.reply_out(stored(NoAgentAvailable()))
    assert empty == expected(no_agent_available=pb.NoAgentAvailable())
    assert empty.event.WhichOneof("payload") == "no_agent_available"
    assert convert.reply_out(stored(HandoffEnded(EndReason.TIMED_OUT))) == expected(
        handoff_ended=pb.HandoffEnded(reason=pb.END_REASON_TIMED_OUT)
    )


@pytest.mark.parametrize(
    "ms", [0, -1, -1_500, 999, -62_135_596_800_000, 253_402_300_799_999, AT_MS]
)
def test_times_match_protobufs_own_conversion(ms: int) -> None:
    own = Timestamp()
    own.FromMilliseconds(ms)
    assert convert.reply_out(stored(NoAgentAvailable(), ms)).event.occurred_at == own
    assert convert.heartbeat_out(ms) == pb.StreamAgentRepliesResponse(
        heartbeat=pb.Heartbeat(sent_at=own)
    )


@pytest.mark.parametrize("ms", [-62_135_596_800_001, 253_402_300_800_000, 2**63])
def test_a_time_no_timestamp_can_carry_is_refused_as_protobuf_refuses_it(ms: int) -> None:
    with pytest.raises(ValueError, match="outside the years 1-9999"):
        convert.reply_out(stored(NoAgentAvailable(), ms))
    with pytest.raises(ValueError, match="must be in range"):
        Timestamp().FromMilliseconds(ms)
