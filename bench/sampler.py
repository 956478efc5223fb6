"""A sampling profiler that a process runs on itself: ``make profile``'s instrument.

Every ``interval_s`` of the process's CPU time (``ITIMER_PROF``; the kernel rounds it up to
its own tick, 4 ms here) the kernel sends it SIGPROF, and the handler counts the main
thread's Python stack. Python runs the handler at its next check for signals (after a call
returns, on entering a function, at a loop's turn), so a sample lands on the line of the
first call made or returned from after the clock ticked over: a long C call, such as a
SQLite statement, gets the samples of its own time. Time the process spends blocked costs no
sample. With the asyncio loop's wakeup descriptor set (it is, once a loop has a signal
handler), each SIGPROF also wakes the loop once: ``_read_from_self`` in the profile.

Why not py-spy, which the earlier rounds used: on this machine kind (a Firecracker VM) its
samples fall on system-call sites far more often than the time spent there. Under section 2's
ingest load it put 11% of the service's samples on one line, the group commit's
``asyncio.get_running_loop()`` (which calls ``getpid``), where ``perf record`` (driven by
the kernel's timer) put 0.06% of the service's CPU in ``getpid`` and this sampler 1.7% in
the whole of ``commit``; the sockets' send and receive calls and SQLite's writes to its
log were overstated alike. docs/bench/history.md has the figures.

``python -m bench.sampler OUT -m MODULE [ARG ...]`` runs ``MODULE`` as ``python -m`` would,
sampling from SIGUSR1 until SIGUSR2, which writes the samples to ``OUT`` (JSON; see
``dump``) and stops. ``bench.profile`` drives it.
"""

from __future__ import annotations

import collections
import json
import runpy
import signal
import sys
from collections.abc import Iterable
from pathlib import Path
from types import FrameType
from typing import Any

# One frame of a sample: file, function (qualified name), line.
Frame = tuple[str, str, int]
# A sample's stack, innermost frame first.
Stack = tuple[Frame, ...]

INTERVAL_S = 0.001


class Sampler:
    """Counts the main thread's Python stacks, one every ``interval_s`` of CPU time."""

    def __init__(self, interval_s: float = INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.samples: collections.Counter[Stack] = collections.Counter()
        self._running = False

    def _on_tick(self, signum: int, frame: FrameType | None) -> None:
        stack: list[Frame] = []
        while frame is not None:
            code = frame.f_code
            stack.append((code.co_filename, code.co_qualname, frame.f_lineno or 0))
            frame = frame.f_back
        self.samples[tuple(stack)] += 1

    def start(self) -> None:
        """Samples from now on (on the main thread: signal handlers are set there only)."""
        if self._running:
            return
        signal.signal(signal.SIGPROF, self._on_tick)
        signal.setitimer(signal.ITIMER_PROF, self.interval_s, self.interval_s)
        self._running = True

    def stop(self) -> None:
        if not self._running:
            return
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        signal.signal(signal.SIGPROF, signal.SIG_IGN)
        self._running = False


def dump(samples: collections.Counter[Stack], path: Path) -> None:
    """``{"stacks": [[count, [[file, function, line], ...]], ...]}``, written whole or not
    at all (a reader polls for the file)."""
    body = {"stacks": [[count, [list(f) for f in stack]] for stack, count in samples.items()]}
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(body))
    partial.replace(path)


def load(path: Path) -> collections.Counter[Stack]:
    body = json.loads(path.read_text())
    samples: collections.Counter[Stack] = collections.Counter()
    for count, frames in body["stacks"]:
        samples[tuple((str(f), str(q), int(n)) for f, q, n in frames)] += int(count)
    return samples


def short_path(filename: str, roots: Iterable[tuple[str, str]]) -> str:
    """``filename`` shortened by the first of ``roots`` (prefix, replacement) it starts with."""
    for prefix, replacement in roots:
        if filename.startswith(prefix):
            return replacement + filename[len(prefix) :]
    return filename


def _functions(stack: Stack, prefixes: tuple[tuple[str, str], ...]) -> set[str]:
    """The functions on a stack, each once, as "file:function" with the file shortened."""
    return {f"{short_path(f, prefixes)}:{q}" for f, q, _ in stack}


def summary(
    samples: collections.Counter[Stack],
    top: int,
    roots: Iterable[tuple[str, str]] = (),
    under: str | None = None,
) -> dict[str, Any]:
    """The samples as shares (percent of all counted, one decimal):

    - ``by_file``: where samples landed (the innermost frame's file);
    - ``inclusive``: the functions on the stack ("file:function"), each counted once a sample,
      but for those on every stack (``main``, the event loop's ``run_forever``): they tell
      nothing;
    - ``self``: the lines samples landed on ("file:line function").

    ``under``: only the samples whose stack holds that function ("file:function"), and the
    shares are of those. Each list is the ``top`` largest, largest first, ties by name.
    """
    prefixes = tuple(roots)
    total = 0
    by_file: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    by_line: collections.Counter[str] = collections.Counter()
    for stack, count in samples.items():
        functions = _functions(stack, prefixes)
        if under is not None and under not in functions:
            continue
        total += count
        if not stack:
            continue
        file, leaf_function, leaf_line = stack[0]
        leaf_file = short_path(file, prefixes)
        by_file[leaf_file] += count
        by_line[f"{leaf_file}:{leaf_line} {leaf_function}"] += count
        for function in functions:
            inclusive[function] += count

    def shares(counter: collections.Counter[str]) -> list[list[object]]:
        told = [item for item in counter.items() if item[1] < total]  # not on every stack
        ranked = sorted(told, key=lambda item: (-item[1], item[0]))[:top]
        return [[name, round(100 * count / total, 1)] for name, count in ranked]

    return {
        "samples": total,
        "by_file": shares(by_file),
        "inclusive": shares(inclusive),
        "self": shares(by_line),
    }


def share(
    samples: collections.Counter[Stack], function: str, roots: Iterable[tuple[str, str]]
) -> float:
    """The fraction of the samples whose stack holds ``function`` ("file:function")."""
    prefixes = tuple(roots)
    total = holding = 0
    for stack, count in samples.items():
        total += count
        if function in _functions(stack, prefixes):
            holding += count
    return holding / total if total else 0.0


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "-m":
        print("usage: python -m bench.sampler OUT -m MODULE [ARG ...]", file=sys.stderr)
        return 2
    out, module, args = Path(argv[0]), argv[2], argv[3:]
    sampler = Sampler()

    def begin(signum: int, frame: FrameType | None) -> None:
        sampler.samples.clear()
        sampler.start()

    def end(signum: int, frame: FrameType | None) -> None:
        sampler.stop()
        dump(sampler.samples, out)

    signal.signal(signal.SIGUSR1, begin)
    signal.signal(signal.SIGUSR2, end)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
