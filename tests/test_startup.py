"""The real process: start-up checks, the sandbox banner, clean stop, and no secret in logs."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from log_audit import audit_output
from support import SERVICE_AGENT_ID, free_port

from service.brevo.sandbox import BrevoSandbox
from service.config import SETTINGS, load_config
from service.http_server import RunningHttpServer, start_http_server
from service.rpc.generated.handoff.v1 import handoff_pb2 as pb
from service.rpc.generated.handoff.v1 import handoff_pb2_grpc as pb_grpc
from service.storage.sqlite import SqliteStore

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "xkeysib-0123456789abcdef-TestSecretKey"
TOKEN = "tok_ThisIsTheWebhookSecret_42"
GRPC_TOKEN = "grpc_ThisIsTheCallersSecret_42"
AUTH = (("authorization", f"Bearer {GRPC_TOKEN}"),)


def base_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BREVO_", "HANDOFF_"))}
    env.update(
        HANDOFF_HOST="127.0.0.1",
        HANDOFF_SQLITE_PATH=str(tmp_path / "svc.db"),
        HANDOFF_GRPC_PORT=str(free_port()),
        HANDOFF_HTTP_PORT=str(free_port()),
        SANDBOX_PORT="0",
        PYTHONUNBUFFERED="1",
    )
    return env


async def start_process(env: dict[str, str]) -> asyncio.subprocess.Process:
    """``python -m service`` with stdout and stderr merged into one pipe."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )


async def run_to_exit(env: dict[str, str], timeout_s: float = 30) -> tuple[int, str]:
    proc = await start_process(env)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode is not None
    audit_output("service process", out.decode())
    return proc.returncode, out.decode()


@pytest.fixture
async def brevo() -> AsyncIterator[tuple[BrevoSandbox, RunningHttpServer]]:
    """A stand-alone Brevo sandbox that knows API_KEY, as the real Brevo would."""
    sandbox = BrevoSandbox(api_key=API_KEY, auto_agent=True, agent_reply_delay_s=0.05)
    server = await start_http_server(sandbox.app, "127.0.0.1", 0)
    try:
        yield sandbox, server
    finally:
        await sandbox.aclose()
        await server.stop(1)


async def test_a_refused_key_stops_start_up_with_one_line(
    tmp_path: Path, brevo: tuple[BrevoSandbox, RunningHttpServer]
) -> None:
    _, server = brevo
    env = base_env(tmp_path)
    env.update(
        BREVO_API_KEY="xkeysib-wrong-key-000",
        BREVO_BASE_URL=f"{server.base_url}/v3",
        BREVO_AGENT_ID=SERVICE_AGENT_ID,
        WEBHOOK_TOKEN=TOKEN,
    )
    code, out = await run_to_exit(env)
    assert code == 1
    lines = [line for line in out.splitlines() if line.startswith("cannot start:")]
    assert len(lines) == 1, out
    assert "key" in lines[0]
    assert "IP" in lines[0]
    assert "xkeysib-wrong-key-000" not in out


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"BREVO_API_KEY": API_KEY, "BREVO_AGENT_ID": "a"}, "WEBHOOK_TOKEN"),
        ({"BREVO_API_KEY": API_KEY, "WEBHOOK_TOKEN": TOKEN}, "BREVO_AGENT_ID"),
        ({"WEBHOOK_TOKEN": "short"}, "WEBHOOK_TOKEN"),
        ({"HANDOFF_GRPC_PORT": "http"}, "HANDOFF_GRPC_PORT"),
        ({"HANDOFF_AGENT_TIMEOUT_SECONDS": "-1"}, "HANDOFF_AGENT_TIMEOUT_SECONDS"),
        ({"REDIS_URL": "http://redis:6379"}, "REDIS_URL"),
        ({"REDIS_URL": "redis://r:6379", "REDIS_STREAM_MAXLEN": "5"}, "REDIS_STREAM_MAXLEN"),
    ],
)
async def test_a_missing_or_bad_setting_is_named(
    tmp_path: Path, extra: dict[str, str], named: str
) -> None:
    env = base_env(tmp_path)
    env.update(extra)
    code, out = await run_to_exit(env)
    assert code == 2
    assert out.startswith("configuration error:")
    assert named in out
    assert API_KEY not in out


async def test_a_port_or_a_file_already_taken_stops_start_up_with_one_line(
    tmp_path: Path,
) -> None:
    """Another program on the sandbox's port, another process on the SQLite file: one line
    that says what to change, and exit code 1, never a traceback."""
    env = base_env(tmp_path)
    env["WEBHOOK_TOKEN"] = TOKEN
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env["SANDBOX_PORT"] = str(taken.getsockname()[1])
        code, out = await run_to_exit(env)
    assert code == 1
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if line.startswith("cannot start:")]
    assert lines == [
        f"cannot start: cannot listen for the built-in Brevo sandbox on port "
        f"{env['SANDBOX_PORT']}: [Errno 98] Address already in use; set SANDBOX_PORT to a "
        "free port (0 picks one), or BREVO_API_KEY to use Brevo itself"
    ], out

    env["SANDBOX_PORT"] = "0"
    holder = await SqliteStore.open(env["HANDOFF_SQLITE_PATH"])  # the other process
    try:
        code, out = await run_to_exit(env)
    finally:
        await holder.close()
    assert code == 1
    assert "Traceback" not in out
    lines = [line for line in out.splitlines() if line.startswith("cannot start:")]
    assert len(lines) == 1, out
    assert "another process is using this file" in lines[0]
    assert env["HANDOFF_SQLITE_PATH"] in lines[0]


async def wait_for_line(stream: asyncio.StreamReader, needle: str, lines: list[str]) -> None:
    while True:
        raw = await asyncio.wait_for(stream.readline(), 30)
        if not raw:
            raise AssertionError(f"process ended before {needle!r}: {lines}")
        lines.append(raw.decode())
        if needle in lines[-1]:
            return


async def test_without_a_key_it_says_it_uses_the_sandbox_and_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    env = base_env(tmp_path)
    proc = await start_process(env)
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        await wait_for_line(proc.stdout, "serving gRPC", lines)
        banner = "".join(lines)
        assert "BREVO_API_KEY is not set" in banner
        assert "SANDBOX" in banner
        assert "GRPC_AUTH_TOKENS is not set: any client that reaches the gRPC port" in banner
        frozen = re.search(r"garbage collector: (\d+) start-up objects frozen", banner)
        assert frozen is not None, banner
        assert int(frozen[1]) > 10_000  # the modules, classes and functions loaded
        assert "a collection every 50000 allocations" in banner
        async with grpc.aio.insecure_channel(f"127.0.0.1:{env['HANDOFF_GRPC_PORT']}") as channel:
            stub = pb_grpc.HandoffServiceStub(channel)
            started = await stub.StartHandoff(pb.StartHandoffRequest(conversation_id="smoke"))
            assert started.created
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.wait_for(proc.communicate(), 30)
    audit_output("service process", "".join(lines) + rest.decode())
    assert proc.returncode == 0, "".join(lines) + rest.decode()
    assert "shutting down" in rest.decode()


async def test_no_secret_reaches_a_log_line(
    tmp_path: Path, brevo: tuple[BrevoSandbox, RunningHttpServer]
) -> None:
    sandbox, server = brevo
    env = base_env(tmp_path)
    env.update(
        BREVO_API_KEY=API_KEY,
        BREVO_BASE_URL=f"{server.base_url}/v3",
        BREVO_AGENT_ID=SERVICE_AGENT_ID,
        WEBHOOK_TOKEN=TOKEN,
        GRPC_AUTH_TOKENS=GRPC_TOKEN,
        HANDOFF_LOG_LEVEL="DEBUG",
    )
    sandbox.set_webhook_url(f"http://127.0.0.1:{env['HANDOFF_HTTP_PORT']}/webhooks/brevo/{TOKEN}")
    proc = await start_process(env)
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        await wait_for_line(proc.stdout, "serving gRPC", lines)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{env['HANDOFF_GRPC_PORT']}") as channel:
            stub = pb_grpc.HandoffServiceStub(channel)
            handoff = (
                await stub.StartHandoff(
                    pb.StartHandoffRequest(conversation_id="secret-check"), metadata=AUTH
                )
            ).handoff
            call = stub.StreamAgentReplies(
                pb.StreamAgentRepliesRequest(handoff_id=handoff.id), metadata=AUTH
            )
            async for item in call:
                if item.WhichOneof("item") == "event" and item.event.HasField("agent_message"):
                    break
            call.cancel()
            await stub.SendMessage(
                pb.SendMessageRequest(handoff_id=handoff.id, client_message_id="1", text="bye"),
                metadata=AUTH,
            )
            with pytest.raises(grpc.aio.AioRpcError):  # a refused token is not logged either
                await stub.GetHandoff(
                    pb.GetHandoffRequest(handoff_id=handoff.id),
                    metadata=(("authorization", f"Bearer {GRPC_TOKEN}x"),),
                )
            await sandbox.wait_idle()
        # A request with a wrong token is not logged with its path either.
        async with httpx.AsyncClient() as http:
            await http.post(
                f"http://127.0.0.1:{env['HANDOFF_HTTP_PORT']}/webhooks/brevo/{TOKEN}x",
                content=b"{}",
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = await asyncio.wait_for(proc.communicate(), 30)
    log = "".join(lines) + rest.decode()
    audit_output("service process", log)
    assert "webhook stored" in log  # the debug run did log the traffic
    assert "Brevo API key accepted" in log
    assert API_KEY not in log
    assert TOKEN not in log
    assert GRPC_TOKEN not in log
    assert "bearer token not accepted" in log


def test_the_redis_password_counts_as_a_secret() -> None:
    config = load_config(["--redis-url", "redis://:s3cr%40t@redis:6379/0"], environ={})
    assert "s3cr%40t" in config.secrets
    assert "s3cr@t" in config.secrets  # as redis-py sends it
    assert "s3cr" not in repr(config.redis_url)
    assert load_config([], environ={}).redis_url.reveal() == ""  # SQLite by default


def test_help_lists_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        load_config(["--help"], environ={})
    assert exited.value.code == 0
    shown = capsys.readouterr().out
    for setting in SETTINGS:
        assert setting.flag in shown
        assert f"[env {setting.env}]" in " ".join(shown.split())
