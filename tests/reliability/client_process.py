"""gRPC clients that run as processes of their own (silent_client.py, soak_client.py), so
that their memory and CPU are not counted as the service's. Both sides are here: what such
a script uses to answer (``emit``, ``rss_mib``) and what a test uses to drive it
(``ClientProcess``): JSON lines on the script's standard output, commands on its standard
input."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def emit(value: object) -> None:
    """The script's answer: one JSON line on its standard output."""
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


def rss_mib() -> float:
    """The script's own resident memory, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class ClientProcess:
    """A client script running as a process of its own."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        assert proc.stderr is not None
        # Read all along, so that a chatty client never blocks on a full pipe.
        self._stderr = asyncio.create_task(proc.stderr.read())

    @classmethod
    async def start(cls, script: Path, *args: str) -> ClientProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            *args,
            cwd=REPO,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            limit=2**20,
        )
        return cls(script.stem, proc)

    async def answer(self, timeout_s: float) -> dict[str, Any]:
        """Its next JSON line; fails with its error output if it ended instead."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout_s):
            line = await self.proc.stdout.readline()
        if not line:
            async with asyncio.timeout(10):
                error = (await self._stderr).decode(errors="replace")
            raise AssertionError(f"{self.name} ended: {error[-3000:]}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def say(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def close(self) -> int:
        """Closes its standard input (the scripts exit then); returns its exit code."""
        if self.proc.returncode is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                async with asyncio.timeout(10):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        assert self.proc.stdout is not None
        await self.proc.stdout.read()
        await self._stderr
        return self.proc.returncode if self.proc.returncode is not None else -1
