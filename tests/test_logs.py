"""Log lines: JSON with the handoff id, no message text unless asked, and the audit that
checks the whole test run for secrets really finds them."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from log_audit import LogAudit
from support import Harness, close_harness, make_config, open_harness

from service.core.log_context import bind_handoff
from service.logs import JsonFormatter, RedactSecrets
from service.rpc.generated.handoff.v1 import handoff_pb2 as pb


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def parsed(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.lines]


@pytest.fixture
def lines() -> Iterator[Lines]:
    handler = Lines()
    logging.getLogger().addHandler(handler)  # the session keeps the root at DEBUG
    try:
        yield handler
    finally:
        logging.getLogger().removeHandler(handler)


def test_a_json_line_names_the_handoff_bound_to_the_task() -> None:
    record = logging.LogRecord("service.x", logging.INFO, __file__, 1, "sent %s", ("it",), None)
    formatter = JsonFormatter()

    async def in_a_task() -> str:
        bind_handoff("ho_abc")
        return formatter.format(record)

    line = json.loads(asyncio.run(in_a_task()))
    assert line["message"] == "sent it"
    assert line["level"] == "INFO"
    assert line["logger"] == "service.x"
    assert line["handoff_id"] == "ho_abc"
    assert str(line["time"]).endswith("+00:00")
    # Another task never saw that binding.
    assert "handoff_id" not in json.loads(formatter.format(record))


async def run_one_exchange(h: Harness) -> str:
    handoff = await h.start_handoff("conv-logs")
    await h.stub.SendMessage(
        pb.SendMessageRequest(
            handoff_id=handoff.id, client_message_id="1", text="my card number is 4242"
        )
    )
    await h.sandbox.agent_says(handoff.visitor_id, "I see the card ending 4242")
    await h.settle()
    return handoff.id


async def test_lines_about_a_handoff_carry_its_id_and_no_message_text(
    tmp_path: Path, lines: Lines
) -> None:
    h = await open_harness(make_config(tmp_path))
    try:
        handoff_id = await run_one_exchange(h)
    finally:
        await close_harness(h)
    parsed = lines.parsed()
    about = [line for line in parsed if line.get("handoff_id") == handoff_id]
    messages = [str(line["message"]) for line in about]
    assert "handoff started" in messages
    assert any(m.startswith("relayed to the agent as ") for m in messages)
    assert any(m.startswith("agent message ") for m in messages)
    assert any(m.startswith("webhook stored") for m in messages)
    assert not any("4242" in line for line in lines.lines)
    assert "relayed to the agent as" in " ".join(messages)
    assert any(m.endswith(": <22 characters>") for m in messages)


async def test_message_text_is_logged_only_when_the_setting_asks(
    tmp_path: Path, lines: Lines
) -> None:
    h = await open_harness(make_config(tmp_path, "--log-message-text", "on"))
    try:
        await run_one_exchange(h)
    finally:
        await close_harness(h)
    texts = [str(line["message"]) for line in lines.parsed()]
    assert any(m.endswith(": 'my card number is 4242'") for m in texts)
    assert any(m.endswith(": 'I see the card ending 4242'") for m in texts)


def test_the_audit_finds_a_planted_secret_and_key_shapes() -> None:
    audit = LogAudit()
    audit.add_secrets(["tok_PlantedWebhookToken_123", "short"])
    audit.record("a", '{"message": "POST /webhooks/brevo/tok_PlantedWebhookToken_123"}')
    audit.record("b", "using key xkeysib-abcdef012345 now\nsandbox-0123456789abcdef seen")
    audit.record("c", "nothing to see; short is too short to count as a secret")
    found = sorted((leak.source, leak.secret) for leak in audit.leaks())
    assert found == [
        ("a", "tok_PlantedWebhookToken_123"),
        ("b", "sandbox-0123456789abcdef"),
        ("b", "xkeysib-abcdef012345"),
    ]
    assert "tok_PlantedWebhookToken_123" not in audit.leaks()[0].describe()


def test_the_redaction_filter_masks_a_secret_in_the_final_text() -> None:
    record = logging.LogRecord(
        "service.x",
        logging.INFO,
        __file__,
        1,
        "url %s",
        ("/webhooks/brevo/tok_0123456789abcdef",),
        None,
    )
    assert RedactSecrets(["tok_0123456789abcdef"]).filter(record)
    assert record.getMessage() == "url /webhooks/brevo/***"
