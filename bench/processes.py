"""Starting and stopping the benchmark's processes: the service (``python -m service``,
exactly as deployed), the stand-in Brevo and the bare baselines (``bench.servers``), a
private redis-server, and the stream clients (``bench.streams``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
WEBHOOK_TOKEN = "bench-webhook-token-0123456789abcdef"  # noqa: S105 (a benchmark's own)


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port free right now, for a process that must be told its port.

    Below the kernel's ephemeral range: a port the kernel picked for ``bind(0)`` is one it
    also gives the outgoing connections of every process, and one of them took such a
    port between this call and the service's bind (a 'cannot listen for webhooks ...
    Address already in use' in make test, 2026-12-02). Never the same port twice in a run.
    """
    low = _ephemeral_low()
    for _ in range(1000):
        port = random.randrange(10_000, max(low, 10_001))
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free loopback port found between 10000 and {low}")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Proc:
    name: str
    process: asyncio.subprocess.Process
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 20)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


def _log_file(log_dir: Path, name: str) -> Path:
    log_dir.mkdir(parents=True, exist_ok=True)
    return log_dir / f"{name}.log"


def _remove_sqlite(path: str) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(path + suffix).unlink(missing_ok=True)


async def _spawn(name: str, args: list[str], log_dir: Path, env: dict[str, str]) -> Proc:
    log_path = _log_file(log_dir, name)
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            *args,
            cwd=REPO,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            limit=2**28,  # a report line holds every latency measured
        )
    return Proc(name, process, log_path)


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BREVO_", "HANDOFF_", "WEBHOOK_", "REDIS_", "GRPC_"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


async def start_json_server(
    name: str,
    log_dir: Path,
    kind: str | None = None,
    launcher: Sequence[str] = (),
    env: dict[str, str] | None = None,
    module: str = "bench.servers",
) -> tuple[Proc, dict[str, Any]]:
    """``bench.servers`` of ``kind`` (default: ``name``: ``bare``, ``standin`` or ``floor``),
    logging as ``name``; returns it and the ports it printed. ``launcher``: arguments to
    Python before ``-m bench.servers`` (``bench.profile`` runs it under ``bench.sampler``);
    ``env``: variables added to its environment; ``module``: another module serving
    ``kind`` so (``bench.transports``)."""
    kind = kind or name
    args = [sys.executable, *launcher, "-m", module, kind]
    proc = await _spawn(name, args, log_dir, _env(env))
    assert proc.process.stdout is not None
    line = await asyncio.wait_for(proc.process.stdout.readline(), 30)
    if not line:
        raise RuntimeError(f"{name} did not start: see {proc.log_path}")
    ports: dict[str, Any] = json.loads(line)
    return proc, ports


@dataclass
class ServiceProc(Proc):
    grpc_port: int = 0
    http_port: int = 0

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def webhook_path(self) -> str:
        return f"/webhooks/brevo/{WEBHOOK_TOKEN}"


async def start_service(
    name: str,
    standin_port: int,
    api_key: str,
    agent_id: str,
    log_dir: Path,
    *,
    launcher: Sequence[str] = (),
    **env: str,
) -> ServiceProc:
    """``python -m service`` on free ports against the stand-in Brevo, default settings but
    for ``env`` (SQLite in the log folder unless REDIS_URL is given). ``launcher``: arguments
    to Python before ``-m service``."""
    grpc_port, http_port = free_port(), free_port()
    settings = {
        "BREVO_API_KEY": api_key,
        "BREVO_BASE_URL": f"http://127.0.0.1:{standin_port}/v3",
        "BREVO_AGENT_ID": agent_id,
        "WEBHOOK_TOKEN": WEBHOOK_TOKEN,
        "HANDOFF_HOST": "127.0.0.1",
        "HANDOFF_GRPC_PORT": str(grpc_port),
        "HANDOFF_HTTP_PORT": str(http_port),
        "HANDOFF_SQLITE_PATH": str(log_dir / f"{name}.db"),
        **env,
    }
    _remove_sqlite(settings["HANDOFF_SQLITE_PATH"])
    args = [sys.executable, *launcher, "-m", "service"]
    proc = await _spawn(name, args, log_dir, _env(settings))
    deadline = time.monotonic() + 60
    while "serving gRPC" not in proc.log_path.read_text(errors="replace"):
        if proc.process.returncode is not None or time.monotonic() > deadline:
            raise RuntimeError(f"service {name} did not start: see {proc.log_path}")
        await asyncio.sleep(0.05)
    return ServiceProc(name, proc.process, proc.log_path, grpc_port, http_port)


class RedisProc:
    """A private redis-server on a free port: the append-only file on, fsync every second
    (Redis' default policy, and what the README asks for at the least)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run `make redis` first")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = await asyncio.create_subprocess_exec(
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.folder),
            "--save",
            "",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                await writer.wait_closed()
                return
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()


class StreamClients:
    """``bench.streams`` in a process of its own, driven by JSON lines."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, target: str, log_dir: Path, name: str = "streams") -> StreamClients:
        proc = await _spawn(name, [sys.executable, "-m", "bench.streams", target], log_dir, _env())
        return cls(proc)

    async def command(self, timeout_s: float = 120, **command: object) -> dict[str, Any]:
        stdin, stdout = self.proc.process.stdin, self.proc.process.stdout
        assert stdin is not None
        assert stdout is not None
        stdin.write(json.dumps(command).encode() + b"\n")
        await stdin.drain()
        line = await asyncio.wait_for(stdout.readline(), timeout_s)
        if not line:
            raise RuntimeError(f"stream clients ended: see {self.proc.log_path}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def close(self) -> None:
        if self.proc.process.returncode is None:
            with contextlib.suppress(Exception):
                await self.command(timeout_s=30, cmd="close")
        await self.proc.stop()
