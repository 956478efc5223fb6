"""`make stubs`: client code for Go, Java and TypeScript generated from protos/, compiled.

The stubs are generated into a temporary folder by scripts/gen_client_stubs.sh (buf with local
plugins), then built offline with the toolchains scripts/ensure-stub-tools.sh installs: Go
against Debian's gRPC and protobuf sources (GOPATH mode), javac against Debian's protobuf-java
and grpc-java jars, tsc against the npm packages pinned in scripts/stub-tools/. A missing tool
fails these tests: `make test` runs the ensure script first. The Go example (examples/go) is
built too, and played against the service through a proxy that cuts its reply stream.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from log_audit import audit_output
from support import free_port

ROOT = Path(__file__).resolve().parent.parent
GENERATE = ROOT / "scripts" / "gen_client_stubs.sh"
NODE_MODULES = ROOT / "build" / "stub-tools" / "node_modules"
GO_PACKAGE = "brevo-handoff/gen/go/handoff/v1"
JARS = [
    Path("/usr/share/java") / f"{name}.jar"
    for name in (
        "protobuf",
        "grpc-api",
        "grpc-stub",
        "grpc-protobuf",
        "grpc-protobuf-lite",
        "guava",
        "geronimo-annotation-1.3-spec",
    )
]
MISSING = "missing: run scripts/ensure-stub-tools.sh (make stubs)"


def run(
    args: Sequence[str | Path],
    *,
    cwd: Path = ROOT,
    env: dict[str, str] | None = None,
    timeout: float = 90,
) -> str:
    """Runs a command that must succeed; returns its output (stdout and stderr)."""
    tool = str(args[0])
    assert shutil.which(tool) is not None, f"{tool} {MISSING}"
    result = subprocess.run(  # noqa: S603 - fixed commands of this test
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stdout}"
    return result.stdout


@pytest.fixture(scope="module")
def stubs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stubs")
    env = {**os.environ, "BUF_CACHE_DIR": str(tmp_path_factory.mktemp("buf-cache"))}
    run([GENERATE, out], env=env)
    return out


@pytest.fixture(scope="module")
def go_env(stubs: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Go in GOPATH mode, offline: the stubs under their import path, the rest from Debian."""
    # gRPC-Go 1.33 needs github.com/golang/protobuf 1.5 (on google.golang.org/protobuf): with
    # 1.3, which apt may pick for golang-google-grpc-dev, every call panics.
    registry = Path("/usr/share/gocode/src/github.com/golang/protobuf/proto/registry.go")
    assert registry.is_file(), f"golang-github-golang-protobuf-1-5-dev {MISSING}"
    gopath = tmp_path_factory.mktemp("gopath")
    shutil.copytree(stubs / "go" / "handoff" / "v1", gopath / "src" / GO_PACKAGE)
    return {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": f"{gopath}:/usr/share/gocode",
        "GOCACHE": str(ROOT / "build" / "cache" / "go-build"),  # Debian's packages, built once
        "GOPROXY": "off",
        "GOFLAGS": "",
        "GOENV": "off",
        "GOTOOLCHAIN": "local",
        "CGO_ENABLED": "0",
    }


@pytest.fixture(scope="module")
def go_example(go_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    binary = tmp_path_factory.mktemp("go-example") / "handoff-bot"
    run(["go", "build", "-o", binary, "."], cwd=ROOT / "examples" / "go", env=go_env)
    return binary


def test_the_stubs_of_each_language_are_generated(stubs: Path) -> None:
    files = {str(p.relative_to(stubs)) for p in stubs.rglob("*") if p.is_file()}
    assert {f for f in files if f.startswith(("go/", "ts/"))} == {
        "go/handoff/v1/handoff.pb.go",
        "go/handoff/v1/handoff_grpc.pb.go",
        "ts/handoff/v1/handoff.ts",
        "ts/google/protobuf/timestamp.ts",
    }
    java = stubs / "java" / "com" / "handoff" / "v1"
    assert {f for f in files if f.startswith("java/")} >= {
        f"java/com/handoff/v1/{name}.java"
        for name in ("HandoffServiceGrpc", "HandoffProto", "StartHandoffRequest", "HandoffEvent")
    }
    go = (stubs / "go" / "handoff" / "v1" / "handoff_grpc.pb.go").read_text()
    for name in ("package handoffv1", "HandoffServiceClient", "StreamAgentReplies"):
        assert name in go
    grpc_java = (java / "HandoffServiceGrpc.java").read_text()
    assert "package com.handoff.v1;" in grpc_java
    assert "getStreamAgentRepliesMethod" in grpc_java
    ts = (stubs / "ts" / "handoff" / "v1" / "handoff.ts").read_text()
    for name in ("HandoffServiceClient", "streamAgentReplies", '"@grpc/grpc-js"'):
        assert name in ts


def test_go_stubs_build(go_env: dict[str, str]) -> None:
    run(["go", "build", GO_PACKAGE], env=go_env)
    run(["go", "vet", GO_PACKAGE], env=go_env)


JAVA_CHECK = """
import com.handoff.v1.*;
import io.grpc.MethodDescriptor;

public class Check {
  public static void main(String[] args) throws Exception {
    StartHandoffRequest request = StartHandoffRequest.newBuilder()
        .setConversationId("conv-1")
        .setUser(User.newBuilder().setName("Ada L.").putAttributes("plan", "pro"))
        .addHistory(HistoryTurn.newBuilder().setRole(Role.ROLE_USER).setText("hello"))
        .build();
    StartHandoffRequest parsed = StartHandoffRequest.parseFrom(request.toByteArray());
    if (!parsed.equals(request)) throw new AssertionError("the round trip changed the message");
    MethodDescriptor<StreamAgentRepliesRequest, StreamAgentRepliesResponse> method =
        HandoffServiceGrpc.getStreamAgentRepliesMethod();
    System.out.println(method.getFullMethodName() + " " + method.getType() + " "
        + parsed.getUser().getAttributesMap());
  }
}
"""


def test_java_stubs_compile_and_run(stubs: Path, tmp_path: Path) -> None:
    for jar in JARS:
        assert jar.is_file(), f"{jar} {MISSING}"
    classes = tmp_path / "classes"
    (tmp_path / "Check.java").write_text(JAVA_CHECK)
    sources = sorted((stubs / "java").rglob("*.java"))
    classpath = ":".join(map(str, JARS))
    output = run(
        ["javac", "-Werror", "-d", classes, "-cp", classpath, *sources, tmp_path / "Check.java"]
    )
    assert output == ""
    assert (classes / "com" / "handoff" / "v1" / "HandoffServiceGrpc.class").is_file()
    output = run(["java", "-cp", f"{classes}:{classpath}", "Check"])
    assert output == "handoff.v1.HandoffService/StreamAgentReplies SERVER_STREAMING {plan=pro}\n"


TS_CHECK = """
import { credentials } from "@grpc/grpc-js";
import {
  HandoffServiceClient,
  HandoffServiceService,
  Role,
  StartHandoffRequest,
  StreamAgentRepliesResponse,
} from "./ts/handoff/v1/handoff";

// Type-checked, not run: how a bot follows the replies, resuming after the last cursor.
export function follow(client: HandoffServiceClient, handoffId: string, afterCursor: string): void {
  const call = client.streamAgentReplies({ handoffId, afterCursor });
  call.on("data", (item: StreamAgentRepliesResponse) => {
    if (item.event?.agentMessage) {
      console.log(item.event.cursor, item.event.agentMessage.text);
    }
  });
}

const request = StartHandoffRequest.fromPartial({
  conversationId: "conv-1",
  user: { name: "Ada L.", attributes: { plan: "pro" } },
  history: [{ role: Role.ROLE_USER, text: "hello", time: new Date(0) }],
});
const parsed = StartHandoffRequest.decode(StartHandoffRequest.encode(request).finish());
const client = new HandoffServiceClient("127.0.0.1:1", credentials.createInsecure());
client.close();
const method = HandoffServiceService.streamAgentReplies;
console.log(JSON.stringify([method.path, method.responseStream, parsed.user?.attributes,
  parsed.history[0]?.time?.toISOString()]));
"""

TSCONFIG = {
    "compilerOptions": {
        "strict": True,
        "target": "ES2020",
        "module": "commonjs",
        "moduleResolution": "node",
        "skipLibCheck": True,  # the packages' own .d.ts files; the stubs are all checked
        "esModuleInterop": True,
        "types": ["node"],
        "outDir": "out",
    },
    "include": ["ts/**/*.ts", "check.ts"],
}


def test_typescript_stubs_typecheck_and_run(stubs: Path, tmp_path: Path) -> None:
    tsc = NODE_MODULES / "typescript" / "bin" / "tsc"
    assert tsc.is_file(), f"{tsc} {MISSING}"
    shutil.copytree(stubs / "ts", tmp_path / "ts")
    (tmp_path / "node_modules").symlink_to(NODE_MODULES)
    (tmp_path / "tsconfig.json").write_text(json.dumps(TSCONFIG))
    (tmp_path / "check.ts").write_text(TS_CHECK)
    assert run(["node", tsc, "-p", "tsconfig.json"], cwd=tmp_path) == ""
    output = run(["node", "out/check.js"], cwd=tmp_path)
    assert json.loads(output) == [
        "/handoff.v1.HandoffService/StreamAgentReplies",
        True,
        {"plan": "pro"},
        "1970-01-01T00:00:00.000Z",
    ]


def test_go_example_builds(go_example: Path, go_env: dict[str, str]) -> None:
    assert go_example.is_file()
    run(["go", "vet", "."], cwd=ROOT / "examples" / "go", env=go_env)


# The Go example against the real service (Brevo sandbox, simulated agent Sam), through a
# proxy that cuts every connection once the first user message is sent, and refuses new ones
# for a while: Sam's answer comes while the bot is cut off, and must reach it exactly once.


@dataclass
class CuttableProxy:
    """A TCP proxy to 127.0.0.1:upstream whose connections can be cut at will."""

    upstream: int
    down: bool = False
    server: asyncio.Server | None = None
    writers: set[asyncio.StreamWriter] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            if self.down:
                writer.transport.abort()
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
            self.writers |= {writer, up_writer}
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            self.tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            self.writers.discard(writer)
            writer.transport.abort()

    def cut(self, seconds: float) -> None:
        """Resets every connection, and refuses new ones for this long."""
        self.down = True
        for writer in list(self.writers):
            writer.transport.abort()
        asyncio.get_running_loop().call_later(seconds, setattr, self, "down", False)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        self.cut(0)
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()


@dataclass
class Process:
    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    @property
    def output(self) -> str:
        return "".join(self.lines)


async def spawn(*args: str, env: dict[str, str], cwd: Path = ROOT) -> Process:
    process = await asyncio.create_subprocess_exec(
        *args, cwd=cwd, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    return Process(process)


async def wait_for_line(proc: Process, text: str, within: float) -> None:
    """Reads the output until a line contains ``text``, then keeps draining it."""
    stdout = proc.process.stdout
    assert stdout is not None

    async def until() -> None:
        async for raw in stdout:
            proc.lines.append(raw.decode())
            if text in proc.lines[-1]:
                return
        raise AssertionError(f"ended before {text!r}:\n{proc.output}")

    await asyncio.wait_for(until(), within)

    async def drain() -> None:
        async for raw in stdout:
            proc.lines.append(raw.decode())

    proc.reader = asyncio.create_task(drain())


async def finish(proc: Process, within: float) -> int:
    """Waits for the process to end (SIGTERM after ``within`` seconds, then SIGKILL)."""
    try:
        await asyncio.wait_for(proc.process.wait(), within)
    except TimeoutError:
        proc.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.process.wait(), 10)
        except TimeoutError:
            proc.process.kill()
            await proc.process.wait()
    if proc.reader is not None:
        await proc.reader
    audit_output("subprocess", proc.output)
    return proc.process.returncode if proc.process.returncode is not None else -1


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[int]:
    """The service in sandbox mode as its own process; yields its gRPC port."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BREVO_", "HANDOFF_", "REDIS_", "SANDBOX_", "WEBHOOK_"))
    }
    grpc_port = free_port()
    env.update(
        HANDOFF_HOST="127.0.0.1",
        HANDOFF_GRPC_PORT=str(grpc_port),
        HANDOFF_HTTP_PORT=str(free_port()),
        HANDOFF_SQLITE_PATH=str(tmp_path / "handoff.db"),
        SANDBOX_PORT="0",
        SANDBOX_AGENT_DELAY_SECONDS="0.3",
        PYTHONUNBUFFERED="1",
    )
    proc = await spawn(sys.executable, "-m", "service", env=env)
    try:
        await wait_for_line(proc, "serving gRPC", 30)
        yield grpc_port
    finally:
        if proc.process.returncode is None:
            proc.process.send_signal(signal.SIGTERM)
        await finish(proc, 30)


async def test_go_example_resumes_its_stream_after_a_cut_and_misses_nothing(
    go_example: Path, service: int
) -> None:
    proxy = CuttableProxy(service)
    port = await proxy.start()
    bot = await spawn(str(go_example), "-addr", f"127.0.0.1:{port}", env=dict(os.environ))
    try:
        await wait_for_line(bot, "bot -> SendMessage: The box was crushed", 30)
        proxy.cut(1.5)
        code = await finish(bot, 30)
    finally:
        await proxy.close()
        if bot.process.returncode is None:
            bot.process.kill()
            await finish(bot, 10)
    assert code == 0, bot.output
    lines = bot.output.splitlines()
    events = [line for line in lines if line.startswith("stream <- ")]
    assert [line.split(":")[0] for line in events] == [
        "stream <- agent joined",
        "stream <- Sam (agent)",  # the greeting
        "stream <- Sam (agent)",  # the answer sent while the bot was cut off
        "stream <- Sam (agent)",  # the goodbye
        "stream <- handoff ended",
    ], bot.output
    assert "The box was crushed" in events[2], bot.output
    assert events[-1] == "stream <- handoff ended: END_REASON_AGENT_CLOSED", bot.output
    sent = [line for line in lines if line.startswith("bot -> SendMessage: ")]
    assert sent == [
        "bot -> SendMessage: The box was crushed and the mug inside is broken. (duplicate false)",
        "bot -> SendMessage: That's all, thanks. Bye! (duplicate false)",
    ], bot.output
    assert any(
        line.startswith("stream dropped (Unavailable); resuming after cursor ")
        and 'cursor ""' not in line
        for line in lines
    ), bot.output
