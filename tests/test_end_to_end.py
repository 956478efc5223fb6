"""A bot backend and the sandbox's simulated agent, through real sockets both ways."""

from __future__ import annotations

from pathlib import Path

from support import all_summaries, close_harness, make_config, open_harness

from service.brevo.sandbox import SANDBOX_AGENT
from service.rpc.generated.handoff.v1 import handoff_pb2 as pb

SAM = SANDBOX_AGENT["id"]


async def test_whole_conversation_in_order(tmp_path: Path, store_flags: tuple[str, ...]) -> None:
    h = await open_harness(make_config(tmp_path, "--sandbox-agent", "on", *store_flags))
    try:
        handoff = await h.start_handoff(
            user=pb.User(name="Ada L.", email="ada@example.org"), title="Damaged order"
        )
        call = h.stub.StreamAgentReplies(pb.StreamAgentRepliesRequest(handoff_id=handoff.id))
        script = ["the mug is broken", "thanks, bye"]
        events: list[pb.HandoffEvent] = []
        async for item in call:
            if item.WhichOneof("item") != "event":
                continue
            events.append(item.event)
            if item.event.WhichOneof("payload") == "agent_message" and script:
                text = script.pop(0)
                await h.stub.SendMessage(
                    pb.SendMessageRequest(
                        handoff_id=handoff.id, client_message_id=f"m{len(script)}", text=text
                    )
                )
        # The stream of one handoff completes by itself after HandoffEnded.
        assert all_summaries(events) == [
            ("joined", SAM, "Sam"),
            (
                "message",
                events[1].agent_message.brevo_message_id,
                SAM,
                "Sam",
                "Hi, I'm Sam from the support team. "
                "I have read the conversation so far - how can I help?",
            ),
            (
                "message",
                events[2].agent_message.brevo_message_id,
                SAM,
                "Sam",
                'Thanks, noted: "the mug is broken"',
            ),
            (
                "message",
                events[3].agent_message.brevo_message_id,
                SAM,
                "Sam",
                "Glad I could help. I am closing this chat now.",
            ),
            ("ended", "END_REASON_AGENT_CLOSED"),
        ]
        ids = [e.agent_message.brevo_message_id for e in events[1:4]]
        thread = h.sandbox.messages(handoff.visitor_id)
        assert ids == [m["id"] for m in thread if m.get("agentId") == SAM]
        # The agent saw the user's words, prefixed, between its own.
        assert [m["text"] for m in thread if m.get("agentId") != SAM][1:] == [
            "Botpress User: the mug is broken",
            "Botpress User: thanks, bye",
        ]
        cursors = [int(e.cursor.split(".")[1]) for e in events]
        assert cursors == sorted(cursors)
        final = await h.stub.GetHandoff(pb.GetHandoffRequest(handoff_id=handoff.id))
        assert final.handoff.state == pb.HANDOFF_STATE_ENDED
        assert [a.name for a in final.handoff.agents] == ["Sam"]
    finally:
        await close_harness(h)
