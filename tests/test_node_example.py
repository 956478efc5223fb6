"""The Node example (examples/node) end to end, against the real service as a process.

The Brevo sandbox runs in this test process with its simulated agent Sam, so that it
outlives the service, which is stopped with SIGTERM and started again (same gRPC port,
same SQLite file) while the example is streaming. Sam's webhooks reach the service through
a gate that holds them while the service is down, as Brevo would retry them.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from log_audit import audit_output
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from support import SERVICE_AGENT_ID, free_port, until

from service.brevo.sandbox import GOODBYE_TEXT, GREETING_TEXT, BrevoSandbox, noted_text
from service.http_server import RunningHttpServer, start_http_server

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "node"
API_KEY = "xkeysib-node-example-0123456789-SecretKey"
TOKEN = "tok_NodeExampleWebhookSecret_0042"
GRPC_TOKEN = "grpc-node-example-Token-0123456789"  # the service requires it
PREFIX = "Botpress User: "
SAM = {"id": "SandboxAgentSam01", "name": "Sam"}
AGENT_DELAY_S = 0.4
FIRST = "Hello, the mug in my order arrived broken."
MORE = ["It is the blue one, order 1042.", "A replacement would be great.", "Thanks, bye!"]

Line = dict[str, object]


async def run_quietly(*command: str, timeout_s: float) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *command, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


async def ensure_node_modules() -> str:
    """The example's dependencies, installed from its lock file when missing or stale;
    returns the node executable."""
    node = shutil.which("node")
    assert node is not None, "node (v18 or newer) is needed to run examples/node"
    lock = EXAMPLE / "package-lock.json"
    installed = EXAMPLE / "node_modules" / ".package-lock.json"  # written by every npm install
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        npm = shutil.which("npm")
        assert npm is not None, "npm is needed to install the dependencies of examples/node"
        code, output = await run_quietly(
            npm, "ci", "--prefix", "examples/node", "--no-audit", "--no-fund", timeout_s=90
        )
        assert code == 0, f"npm ci failed:\n{output}"
    return node


@dataclass
class Reader:
    """A process whose output lines are collected as they come."""

    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    def start(cls, process: asyncio.subprocess.Process) -> Reader:
        reader = cls(process)

        async def read(stream: asyncio.StreamReader | None, into: list[str]) -> None:
            assert stream is not None
            async for raw in stream:
                into.append(raw.decode(errors="replace"))

        reader.tasks.append(asyncio.create_task(read(process.stdout, reader.lines)))
        if process.stderr is not None:
            reader.tasks.append(asyncio.create_task(read(process.stderr, reader.errors)))
        return reader

    @property
    def output(self) -> str:
        return "".join(self.lines) + "".join(self.errors)

    async def finish(self, timeout_s: float, sig: signal.Signals | None = None) -> int:
        """Signals the process (if given and still running), waits for its exit and the end
        of its output; kills it when it does not exit in time."""
        try:
            if sig is not None and self.process.returncode is None:
                self.process.send_signal(sig)
            return await asyncio.wait_for(self.process.wait(), timeout_s)
        finally:
            await self.kill()

    async def kill(self) -> None:
        """Kills the process unless it has exited, and reads the rest of its output."""
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
        await asyncio.wait_for(asyncio.gather(*self.tasks), 10)
        audit_output("subprocess", self.output)


class ServiceProcess:
    """``python -m service`` on fixed ports, so that it can be started again on them."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.runs: list[Reader] = []

    @property
    def log(self) -> str:
        return "".join(run.output for run in self.runs)

    async def start(self) -> None:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service",
            cwd=ROOT,
            env=self.env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        run = Reader.start(process)
        self.runs.append(run)

        def serving() -> bool:
            assert process.returncode is None, f"the service stopped:\n{run.output}"
            return "serving gRPC" in run.output

        await until(serving, 30, "the service serves gRPC")

    async def stop(self) -> int:
        """SIGTERM, as Kubernetes stops a pod; returns the exit code."""
        return await self.runs[-1].finish(30, signal.SIGTERM)


class WebhookGate:
    """Forwards Brevo's webhooks to the service; while closed, holds them (the sandbox's
    delivery waits) instead of letting them fail against a stopped service."""

    def __init__(self, target: str, http: httpx.AsyncClient) -> None:
        self.target = target
        self._http = http
        self._open = asyncio.Event()
        self._open.set()
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.app = Starlette(routes=[Route("/{path:path}", self._forward, methods=["POST"])])

    async def _forward(self, request: Request) -> Response:
        body = await request.body()
        while not self._open.is_set():
            await self._open.wait()
        self._busy += 1
        self._idle.clear()
        try:
            answer = await self._http.post(
                self.target + request.url.path,
                content=body,
                headers={"content-type": "application/json"},
            )
        except httpx.TransportError:
            return Response(status_code=503)  # the sandbox retries, as Brevo does
        finally:
            self._busy -= 1
            if self._busy == 0:
                self._idle.set()
        return Response(answer.content, answer.status_code, media_type="application/json")

    async def close(self) -> None:
        """From now on webhooks wait; returns once those already forwarded are answered."""
        self._open.clear()
        await asyncio.wait_for(self._idle.wait(), 10)

    def open(self) -> None:
        self._open.set()


@dataclass
class World:
    sandbox: BrevoSandbox
    service: ServiceProcess
    gate: WebhookGate
    grpc_port: int


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    grpc_port, http_port = free_port(), free_port()
    sandbox = BrevoSandbox(
        api_key=API_KEY, auto_agent=True, agent_reply_delay_s=AGENT_DELAY_S, user_prefix=PREFIX
    )
    http = httpx.AsyncClient(timeout=10)
    gate = WebhookGate(f"http://127.0.0.1:{http_port}", http)
    servers: list[RunningHttpServer] = []
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BREVO_", "HANDOFF_", "REDIS_", "SANDBOX_", "WEBHOOK_"))
    }
    service: ServiceProcess | None = None
    try:
        brevo = await start_http_server(sandbox.app, "127.0.0.1", 0)
        servers.append(brevo)
        gate_http = await start_http_server(gate.app, "127.0.0.1", 0)
        servers.append(gate_http)
        sandbox.set_webhook_url(f"{gate_http.base_url}/webhooks/brevo/{TOKEN}")
        env.update(
            BREVO_API_KEY=API_KEY,
            BREVO_BASE_URL=f"{brevo.base_url}/v3",
            BREVO_AGENT_ID=SERVICE_AGENT_ID,
            WEBHOOK_TOKEN=TOKEN,
            GRPC_AUTH_TOKENS=GRPC_TOKEN,
            HANDOFF_HOST="127.0.0.1",
            HANDOFF_GRPC_PORT=str(grpc_port),
            HANDOFF_HTTP_PORT=str(http_port),
            HANDOFF_SQLITE_PATH=str(tmp_path / "handoff.db"),
            HANDOFF_HEARTBEAT_SECONDS="1",
            PYTHONUNBUFFERED="1",
        )
        service = ServiceProcess(env)
        yield World(sandbox, service, gate, grpc_port)
    finally:
        gate.open()
        if service is not None and service.runs:
            await service.runs[-1].finish(30, signal.SIGTERM)
        await sandbox.aclose()
        for server in servers:
            await server.stop(1)
        await http.aclose()


def parse(raw: str) -> Line:
    line = json.loads(raw)
    assert isinstance(line, dict), raw
    return line


async def wait_for_line(
    node: Reader, holds: Callable[[Line], bool], what: str, timeout_s: float = 15
) -> None:
    def printed() -> bool:
        assert node.process.returncode is None, f"the example exited early:\n{node.output}"
        return any(holds(parse(raw)) for raw in node.lines)

    await until(printed, timeout_s, f"the example prints {what}:\n{node.output}")


async def test_the_node_example_resumes_across_a_service_restart_and_ends_cleanly(
    world: World,
) -> None:
    node_binary = await ensure_node_modules()
    conversation = "conv-node-example"
    node_process = await asyncio.create_subprocess_exec(
        node_binary,
        str(EXAMPLE / "bot.js"),
        conversation,
        cwd=EXAMPLE,
        env={
            "PATH": os.environ.get("PATH", ""),
            "HANDOFF_ADDR": f"127.0.0.1:{world.grpc_port}",
            "HANDOFF_TOKEN": GRPC_TOKEN,
            "HANDOFF_PROTO": str(ROOT / "protos" / "handoff" / "v1" / "handoff.proto"),
            "BOT_FIRST_MESSAGE": FIRST,
            "MESSAGES": json.dumps(MORE),
            "BOT_RETRY_ATTEMPTS": "40",
            "BOT_BACKOFF_INITIAL_MS": "100",
            "BOT_BACKOFF_MAX_MS": "500",
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    node = Reader.start(node_process)
    try:
        # The example starts before the service: StartHandoff is retried on UNAVAILABLE.
        await until(
            lambda: "StartHandoff failed (UNAVAILABLE" in "".join(node.errors),
            15,
            f"the example retries StartHandoff:\n{node.output}",
        )
        await world.service.start()
        noted_first = noted_text(FIRST)
        await wait_for_line(node, lambda line: line.get("text") == noted_first, "Sam's 2nd reply")

        # Mid-conversation: the example streams, a user message may be in flight, Sam has
        # replies to come. Brevo's webhooks wait while the service restarts.
        await world.gate.close()
        assert await world.service.stop() == 0
        await world.service.start()
        world.gate.open()

        code = await node.finish(30)
        assert code == 0, f"{node.output}\n--- service log ---\n{world.service.log}"
    finally:
        await node.kill()
    assert await world.service.stop() == 0, world.service.log

    lines = [parse(raw) for raw in node.lines]
    transcript = f"{node.output}\n--- service log ---\n{world.service.log}"  # for failures
    started = lines[0]
    assert started["type"] == "handoff_started", transcript
    assert started["conversation_id"] == conversation
    assert started["created"] is True
    visitor_id = started["visitor_id"]
    assert isinstance(visitor_id, str)

    # Every event once, in order, across the restart; each reconnection says where from.
    events = [line for line in lines[1:] if line["type"] not in ("message_sent", "reconnecting")]
    said = [GREETING_TEXT, noted_text(FIRST), *[noted_text(m) for m in MORE[:-1]], GOODBYE_TEXT]
    assert [(e["type"], e.get("agent"), e.get("text"), e.get("reason")) for e in events] == [
        ("agent_joined", SAM, None, None),
        *[("agent_message", SAM, text, None) for text in said],
        ("handoff_ended", None, None, "END_REASON_AGENT_CLOSED"),
    ], transcript
    assert len({e["cursor"] for e in events}) == len(events)
    assert all(e["handoff_id"] == started["handoff_id"] for e in events)

    reconnects = [i for i, line in enumerate(lines) if line["type"] == "reconnecting"]
    assert reconnects, transcript
    restart_at = next(i for i, line in enumerate(lines) if line.get("text") == noted_text(FIRST))
    assert restart_at < reconnects[0], transcript
    assert lines[-1]["type"] == "handoff_ended", transcript
    for i in reconnects:
        last_event = next(
            line
            for line in reversed(lines[:i])
            if line["type"] in ("agent_joined", "agent_message")
        )
        assert lines[i]["after_cursor"] == last_event["cursor"], transcript
        assert "restart" not in lines[i]

    # The user's messages went out once each, in order, whatever retries the restart caused.
    sent = [line["text"] for line in lines if line["type"] == "message_sent"]
    assert sent == [FIRST, *MORE], transcript
    thread = world.sandbox.messages(visitor_id)
    from_service = [str(m["text"]) for m in thread if m.get("agentId") == SERVICE_AGENT_ID]
    assert "Ada L." in from_service[0]  # the opening message
    assert from_service[1:] == [PREFIX + text for text in [FIRST, *MORE]], transcript
    from_sam = [m["id"] for m in thread if m.get("agentId") == SAM["id"]]
    assert from_sam == [e["brevo_message_id"] for e in events if e["type"] == "agent_message"]
