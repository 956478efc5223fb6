"""``make demo``: one whole handoff through the Brevo sandbox, driven by a real gRPC client.

Starts the service in sandbox mode on free ports with a throw-away store, then plays the
bot backend: opens a handoff, relays two user messages, prints every streamed event until
the simulated agent closes the chat.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import uuid
from pathlib import Path

import grpc

from service.app import start_service
from service.config import load_config
from service.rpc.generated.handoff.v1 import handoff_pb2 as pb
from service.rpc.generated.handoff.v1 import handoff_pb2_grpc as pb_grpc


def describe(event: pb.HandoffEvent) -> str:
    kind = event.WhichOneof("payload")
    if kind == "agent_joined":
        return f"agent joined: {event.agent_joined.agent.name}"
    if kind == "agent_message":
        return f"{event.agent_message.agent.name} (agent): {event.agent_message.text}"
    if kind == "no_agent_available":
        return "no agent available"
    if kind == "handoff_ended":
        return f"handoff ended: {pb.EndReason.Name(event.handoff_ended.reason)}"
    return f"unknown event {kind}"


async def run_demo(out: list[str]) -> None:
    with tempfile.TemporaryDirectory() as folder:
        config = load_config(
            [
                "--host",
                "127.0.0.1",
                "--grpc-port",
                "0",
                "--http-port",
                "0",
                "--sandbox-port",
                "0",
                "--sqlite-path",
                str(Path(folder) / "demo.db"),
                "--sandbox-agent-delay-seconds",
                "0.4",
            ],
            environ={},
        )
        running = await start_service(config)
        try:
            await converse(running.grpc_target, out)
        finally:
            await running.stop(1.0)


async def converse(target: str, out: list[str]) -> None:
    def say(line: str) -> None:
        out.append(line)
        print(line, flush=True)

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.HandoffServiceStub(channel)
        started = await stub.StartHandoff(
            pb.StartHandoffRequest(
                conversation_id=f"demo-{uuid.uuid4().hex[:8]}",
                user=pb.User(id="u-1042", name="Ada L.", email="ada@example.org"),
                title="Damaged order",
                description="The customer's order #1042 arrived damaged.",
                history=[
                    pb.HistoryTurn(role=pb.ROLE_USER, text="my order arrived damaged"),
                    pb.HistoryTurn(role=pb.ROLE_BOT, text="Let me get you a human."),
                ],
            )
        )
        handoff = started.handoff
        say(f"bot -> StartHandoff: handoff {handoff.id}, Brevo visitor {handoff.visitor_id}")
        script = ["The box was crushed and the mug is broken.", "That's all, bye!"]
        stream = stub.StreamAgentReplies(pb.StreamAgentRepliesRequest(handoff_id=handoff.id))
        async for item in stream:
            if item.WhichOneof("item") != "event":
                continue
            event = item.event
            say(f"stream <- {describe(event)}")
            if event.WhichOneof("payload") == "agent_message" and script:
                text = script.pop(0)
                await stub.SendMessage(
                    pb.SendMessageRequest(
                        handoff_id=handoff.id, client_message_id=uuid.uuid4().hex, text=text
                    )
                )
                say(f"bot -> SendMessage: {text}")
        final = await stub.GetHandoff(pb.GetHandoffRequest(handoff_id=handoff.id))
        say(f"bot -> GetHandoff: state {pb.HandoffState.Name(final.handoff.state)}")


def main() -> int:
    out: list[str] = []
    asyncio.run(asyncio.wait_for(run_demo(out), timeout=60))
    return 0 if out and "HANDOFF_STATE_ENDED" in out[-1] else 1


if __name__ == "__main__":
    sys.exit(main())
