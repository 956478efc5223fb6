"""The reorder window end to end, on both stores: webhooks Brevo delivers out of order still
reach the streams in createdAt order; what is held survives a restart; an ending flushes it.
"""

from __future__ import annotations

from pathlib import Path

from support import (
    MARTA,
    Harness,
    agent_fragment,
    all_summaries,
    close_harness,
    make_config,
    open_harness,
    until,
)

from service.rpc.generated.handoff.v1 import handoff_pb2 as pb

MARTA_NAME = ""  # fragment_minimal.json names no agent


def message(mid: str, text: str) -> tuple[object, ...]:
    return ("message", mid, MARTA, MARTA_NAME, text)


async def test_a_fragment_delivered_late_still_goes_first(
    tmp_path: Path, store_flags: tuple[str, ...]
) -> None:
    h = await open_harness(make_config(tmp_path, *store_flags, "--reorder-window-seconds", "0.5"))
    try:
        handoff = await h.start_handoff()
        await h.settle()  # the sandbox's own deliveries for the chat land first
        # Brevo delivers the second fragment first, then the first one with a repeat of m3.
        second = agent_fragment(handoff.visitor_id, "m3", "third", n=3)
        first = agent_fragment(handoff.visitor_id, "m1", "first", n=1)
        first_messages = first["messages"]
        assert isinstance(first_messages, list)
        repeat = dict(second["messages"][0])  # type: ignore[index]
        first["messages"] = [
            *first_messages,
            {
                **first_messages[0],
                "id": "m2",
                "text": "second",
                "createdAt": first_messages[0]["createdAt"] + 1,
            },
            repeat,
        ]
        answers = [(await h.post(body)).json() for body in (second, first)]
        # Stored at once (held): no event in the log yet.
        assert answers == [{"outcome": "stored", "events": 0}, {"outcome": "stored", "events": 0}]
        events = await h.collect(handoff.id, 4, timeout_s=10)
        assert all_summaries(events) == [
            ("joined", MARTA, MARTA_NAME),
            message("m1", "first"),
            message("m2", "second"),
            message("m3", "third"),
        ]
        got = (await h.stub.GetHandoff(pb.GetHandoffRequest(handoff_id=handoff.id))).handoff
        assert got.state == pb.HANDOFF_STATE_ACTIVE
        # A redelivery after the release is a duplicate and adds nothing.
        again = await h.post(first)
        assert again.json() == {"outcome": "duplicate", "events": 0}
    finally:
        await close_harness(h)


async def test_held_messages_survive_a_restart(
    tmp_path: Path, store_flags: tuple[str, ...]
) -> None:
    flags = (*store_flags, "--reorder-window-seconds", "0.3")
    h = await open_harness(make_config(tmp_path, *flags))
    handoff = await h.start_handoff()
    answer = await h.post(agent_fragment(handoff.visitor_id, "m1", "held over a restart"))
    assert answer.json() == {"outcome": "stored", "events": 0}
    await close_harness(h)  # before the window ends: the timer goes with the process

    restarted = await open_harness(make_config(tmp_path, *flags))
    try:
        # The new process's sweep finds the message due and releases it.
        events = await restarted.collect(handoff.id, 2, timeout_s=10)
        assert all_summaries(events) == [
            ("joined", MARTA, MARTA_NAME),
            message("m1", "held over a restart"),
        ]
    finally:
        await close_harness(restarted)


async def test_stopping_flushes_what_is_held_before_the_end(
    tmp_path: Path, store_flags: tuple[str, ...]
) -> None:
    h = await open_harness(make_config(tmp_path, *store_flags, "--reorder-window-seconds", "30"))
    try:
        handoff = await h.start_handoff()
        await h.post(agent_fragment(handoff.visitor_id, "m2", "late", n=2))
        await h.post(agent_fragment(handoff.visitor_id, "m1", "early", n=1))
        await h.stub.StopHandoff(pb.StopHandoffRequest(handoff_id=handoff.id))
        events = await h.collect(handoff.id, 4)
        assert all_summaries(events) == [
            ("joined", MARTA, MARTA_NAME),
            message("m1", "early"),
            message("m2", "late"),
            ("ended", "END_REASON_STOPPED_BY_BOT"),
        ]
    finally:
        await close_harness(h)


async def test_an_answer_held_in_the_window_is_not_timed_out(
    tmp_path: Path, store_flags: tuple[str, ...]
) -> None:
    h: Harness = await open_harness(
        make_config(
            tmp_path,
            *store_flags,
            "--reorder-window-seconds",
            "1.5",
            "--agent-timeout-seconds",
            "0.2",
        )
    )
    try:
        handoff = await h.start_handoff()
        await h.post(agent_fragment(handoff.visitor_id, "m1", "I am here"))
        events = await h.collect(handoff.id, 2, timeout_s=10)
        assert all_summaries(events) == [
            ("joined", MARTA, MARTA_NAME),
            message("m1", "I am here"),
        ]

        async def active() -> bool:
            got = await h.stub.GetHandoff(pb.GetHandoffRequest(handoff_id=handoff.id))
            return got.handoff.state == pb.HANDOFF_STATE_ACTIVE

        await until(active, 5, "the handoff is active, not timed out")
        # Meanwhile a handoff nobody answered did time out: the timeout is on.
        other = await h.start_handoff("conv-unanswered")
        ended = await h.collect(other.id, 1, timeout_s=10)
        assert all_summaries(ended) == [("ended", "END_REASON_TIMED_OUT")]
    finally:
        await close_harness(h)
