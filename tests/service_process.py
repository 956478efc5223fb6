"""The service as a real process (``python -m service``), for the tests that need one: two
replicas on one Redis, or a process to ``kill -9``. Its output is kept, and handed to the
session's log audit when it ends."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from log_audit import audit_output
from support import free_port

from service.rpc.generated.handoff.v1 import handoff_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class ServiceProcess:
    name: str
    process: asyncio.subprocess.Process
    grpc_port: int
    http_port: int
    webhook_token: str
    lines: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None
    channel: grpc.aio.Channel | None = None
    start_s: float = 0.0  # from spawning the process to "serving gRPC"

    @property
    def stub(self) -> pb_grpc.HandoffServiceAsyncStub:
        assert self.channel is not None
        return pb_grpc.HandoffServiceStub(self.channel)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def webhook_url(self) -> str:
        return f"{self.base_url}/webhooks/brevo/{self.webhook_token}"

    @property
    def log(self) -> str:
        return "".join(self.lines)


async def start_service_process(
    name: str, env: dict[str, str], webhook_token: str
) -> ServiceProcess:
    """Starts the service on free ports with ``env`` (which must set ``webhook_token`` as
    WEBHOOK_TOKEN) and returns once it serves gRPC, with a channel to it open."""
    grpc_port, http_port = free_port(), free_port()
    spawned = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        cwd=ROOT,
        env={
            # make test's second pass runs the suite on grpclib (GRPC_SERVER=grpclib)
            "GRPC_SERVER": os.environ.get("GRPC_SERVER", "grpcio"),
            **env,
            "HANDOFF_GRPC_PORT": str(grpc_port),
            "HANDOFF_HTTP_PORT": str(http_port),
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    service = ServiceProcess(name, process, grpc_port, http_port, webhook_token)
    serving = asyncio.Event()

    async def read() -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            service.lines.append(raw.decode(errors="replace"))
            if "serving gRPC" in service.lines[-1]:
                serving.set()
        serving.set()  # it ended: the check below shows its output

    service.reader = asyncio.create_task(read())
    try:
        await asyncio.wait_for(serving.wait(), 30)
    except BaseException:
        await finish(service, kill=True)
        raise
    service.start_s = time.monotonic() - spawned
    if process.returncode is not None:
        await finish(service, kill=True)
        raise AssertionError(f"service {name} did not start:\n{service.log[-3000:]}")
    service.channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
    return service


async def finish(service: ServiceProcess, *, kill: bool = False) -> int:
    """SIGTERM, as Kubernetes stops a pod (the test's channel closed first), or SIGKILL, a
    crash (the channel closed after, so that calls in flight meet the crash); returns the
    exit code. Hands the process's output to the log audit."""
    if not kill and service.channel is not None:
        await service.channel.close()
        service.channel = None
    if service.process.returncode is None:
        if kill:
            service.process.kill()
        else:
            service.process.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(service.process.wait(), 30)
    if service.channel is not None:
        await service.channel.close()
        service.channel = None
    if service.reader is not None:
        await asyncio.wait_for(service.reader, 10)
        service.reader = None
        audit_output(f"service {service.name}", service.log)
    return code
