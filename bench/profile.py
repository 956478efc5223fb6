"""``python -m bench.profile [--seconds S] [--top N] [--out DIR]`` (``make profile``): where
the service's CPU goes under ``make bench``'s ingest load (section 2), beside the bare
Starlette route's under the same load.

Starts the stand-in Brevo, the service (``python -m service``, SQLite) and the bare route
(``bench.servers bare``), each a process of its own under ``bench.sampler``, opens 50
handoffs, warms both up, then for each in turn samples it (see ``bench.sampler``) while
section 2's driver posts fragments for ``--seconds``. Prints each one's rate, CPU a
request, and the shares of its samples: by file, by function (inclusive) and by line (self),
the webhook's own code apart (``under`` the route). Writes ``profile.json`` to DIR.

``--bare-spin N``: the bare route first adds 1 N times (interpreter work, no system call).
On this machine kind the socket's sends cost a request more the fewer requests a second
there are (the load driver idles between them, and waking it costs the sender): made about
as slow as the service, the bare route pays for its own sends what the service does.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import sampler
from bench.http_load import LoadResult
from bench.processes import REPO, Proc, start_json_server, start_service
from bench.scenarios import FULL, ingest, open_handoffs
from bench.servers import SERVICE_AGENT, STANDIN_API_KEY

# The webhook route's own code: the service's samples under it are a webhook's own work.
SERVICE_ROUTE = "gateway/app.py:BrevoWebhook._answer"
FLUSH = "service/storage/sqlite.py:SqliteStore._flush_batch"
# The socket's send of a response (asyncio's transport, with the system call).
SEND = "std:asyncio/selector_events.py:_SelectorSocketTransport.write"


def roots() -> list[tuple[str, str]]:
    """How file names are shortened: the installed packages (the virtual environment is in
    the checkout), Python's own library, then the checkout."""
    import sysconfig

    paths = sysconfig.get_paths()
    return [
        (paths["purelib"] + "/", "site:"),
        (paths["platlib"] + "/", "site:"),
        (paths["stdlib"] + "/", "std:"),
        (str(REPO) + "/", ""),
    ]


def _clear(path: Path) -> None:
    path.unlink(missing_ok=True)


def _written(path: Path) -> bool:
    return path.exists()


def _constant(path: str) -> Callable[[int], str]:
    return lambda n: path


async def _sampled(proc: Proc, out: Path, load: Awaitable[LoadResult]) -> tuple[LoadResult, float]:
    """Runs ``load`` while ``proc`` samples itself; returns the load's result and the CPU
    seconds ``proc`` used meanwhile. The samples are in ``out``."""
    _clear(out)
    proc.process.send_signal(signal.SIGUSR1)
    await asyncio.sleep(0.05)  # the handler runs at the process's next bytecode
    cpu_before = proc.cpu()
    result = await load
    cpu = proc.cpu() - cpu_before
    proc.process.send_signal(signal.SIGUSR2)
    deadline = time.monotonic() + 30
    while not _written(out):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} wrote no samples: see {proc.log_path}")
        await asyncio.sleep(0.05)
    return result, cpu


async def run(
    seconds: float, warm_up_s: float, top: int, out_dir: Path, bare_spin: int = 0
) -> dict[str, Any]:
    log_dir = out_dir / "logs"
    procs: list[Proc] = []
    results: dict[str, Any] = {
        "seconds": seconds,
        "interval_s": sampler.INTERVAL_S,
        "bare_spin": bare_spin,
    }
    try:
        standin, standin_ports = await start_json_server("standin", log_dir)
        procs.append(standin)
        svc_samples = out_dir / "service-samples.json"
        bare_samples = out_dir / "bare-samples.json"
        svc = await start_service(
            "service",
            int(standin_ports["http_port"]),
            STANDIN_API_KEY,
            SERVICE_AGENT["id"],
            log_dir,
            launcher=["-m", "bench.sampler", str(svc_samples)],
        )
        procs.append(svc)
        bare, bare_ports = await start_json_server(
            "bare",
            log_dir,
            launcher=["-m", "bench.sampler", str(bare_samples)],
            env={"BENCH_BARE_SPIN": str(bare_spin)},
        )
        procs.append(bare)
        _, visitors = await open_handoffs(svc, 50, "profile")
        targets = {
            "service": (svc, svc.http_port, svc.webhook_path, svc_samples),
            "bare": (bare, int(bare_ports["http_port"]), "/ok", bare_samples),
        }
        warm = dataclasses.replace(FULL, ingest_s=warm_up_s)
        timed = dataclasses.replace(FULL, ingest_s=seconds)
        for _, port, path, _ in targets.values():
            await ingest(port, _constant(path), visitors, warm)
        for name, (proc, port, path, samples_path) in targets.items():
            load, cpu = await _sampled(
                proc, samples_path, ingest(port, _constant(path), visitors, timed)
            )
            samples = sampler.load(samples_path)
            cpu_us = cpu / max(load.requests, 1) * 1e6
            figures: dict[str, Any] = {
                "requests": load.requests,
                "statuses": {str(k): v for k, v in load.statuses.items()},
                "per_s": round(load.requests / load.seconds, 1),
                "server_cpu_us_per_request": round(cpu_us, 1),
                "send_us_per_request": round(sampler.share(samples, SEND, roots()) * cpu_us, 1),
                # The kernel's tick bounds the rate (see bench.sampler).
                "samples_per_cpu_s": round(sum(samples.values()) / max(cpu, 1e-9)),
                "all": sampler.summary(samples, top, roots()),
            }
            if name == "service":
                figures["route"] = sampler.summary(samples, top, roots(), under=SERVICE_ROUTE)
                figures["flush"] = sampler.summary(samples, top, roots(), under=FLUSH)
            results[name] = figures
    finally:
        for proc in reversed(procs):
            await proc.stop()
    return results


def _print_shares(title: str, figures: dict[str, Any], of_all: int) -> None:
    share = 100 * figures["samples"] / max(of_all, 1)
    print(f"\n{title}: {figures['samples']} samples ({share:.1f}% of the process's)")
    for kind in ("by_file", "inclusive", "self"):
        print(f"  {kind}:")
        for name, percent in figures[kind]:
            print(f"    {percent:5.1f}%  {name}")


def profile_ingest(
    seconds: float, warm_up_s: float, top: int, out_dir: Path, bare_spin: int = 0
) -> dict[str, Any]:
    """``run``, its results also written to ``out_dir/profile.json``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = asyncio.run(run(seconds, warm_up_s, top, out_dir, bare_spin))
    (out_dir / "profile.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--seconds", type=float, default=20.0, help="sampled load, each")
    parser.add_argument("--warm-up", type=float, default=3.0, help="load before sampling")
    parser.add_argument("--top", type=int, default=25, help="entries in each list")
    parser.add_argument("--out", default=str(REPO / "build" / "profile"), help="where to write")
    parser.add_argument(
        "--bare-spin",
        type=int,
        default=0,
        help="additions the bare route makes before it answers (0: none); about 900 make it"
        " as slow as the service, to see what the rate alone does to its cost",
    )
    args = parser.parse_args(argv)
    out_dir = Path(args.out)
    results = profile_ingest(args.seconds, args.warm_up, args.top, out_dir, args.bare_spin)
    for name in ("service", "bare"):
        figures = results[name]
        print(
            f"\n== {name}: {figures['per_s']}/s, {figures['server_cpu_us_per_request']} µs of "
            f"CPU a request ({figures['send_us_per_request']} µs of it in the socket's sends), "
            f"statuses {figures['statuses']}, "
            f"{figures['samples_per_cpu_s']} samples a CPU second"
        )
        total = figures["all"]["samples"]
        _print_shares(f"{name}, all", figures["all"], total)
        for part, root in (("route", SERVICE_ROUTE), ("flush", FLUSH)):
            if part in figures:
                _print_shares(f"{name}, under {root}", figures[part], total)
    print(f"\nwrote {out_dir / 'profile.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
