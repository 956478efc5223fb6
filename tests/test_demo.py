"""`make demo` shows the product working: the whole conversation, in order."""

from __future__ import annotations

from service.demo import run_demo


async def test_demo_plays_a_whole_handoff() -> None:
    out: list[str] = []
    await run_demo(out)
    kinds = [line.split(":")[0] for line in out]
    assert kinds == [
        "bot -> StartHandoff",
        "stream <- agent joined",
        "stream <- Sam (agent)",
        "bot -> SendMessage",
        "stream <- Sam (agent)",
        "bot -> SendMessage",
        "stream <- Sam (agent)",
        "stream <- handoff ended",
        "bot -> GetHandoff",
    ]
    assert (
        out[4]
        == 'stream <- Sam (agent): Thanks, noted: "The box was crushed and the mug is broken."'
    )
    assert out[-2] == "stream <- handoff ended: END_REASON_AGENT_CLOSED"
    assert out[-1] == "bot -> GetHandoff: state HANDOFF_STATE_ENDED"
