"""``python -m bench [--quick] [--out DIR]``: the benchmark suite (``make bench``).

Starts the service exactly as deployed (``python -m service``), a stand-in Brevo and the
bare-transport baselines, each a process of its own, and drives them from this process and
from stream-client processes over loopback. Writes ``results.json``, ``results.md`` and
``latency.png`` to DIR (default ``docs/bench``). ``--quick`` is the smoke run of
``make test``: the same code on small sizes; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import report
from bench.processes import REPO, Proc, RedisProc, ServiceProc, start_json_server, start_service
from bench.scenarios import (
    FULL,
    QUICK,
    Sizes,
    bare_target,
    idle_streams,
    ingest_figures,
    ingest_side_by_side,
    open_handoffs,
    send_side_by_side,
    service_target,
    webhook_to_stream,
)
from bench.servers import SERVICE_AGENT, STANDIN_API_KEY


def say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", flush=True)


async def run(sizes: Sizes, log_dir: Path) -> dict[str, Any]:
    results: dict[str, Any] = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "sizes": asdict(sizes),
    }
    procs: list[Proc] = []
    redis: RedisProc | None = None
    try:
        standin, standin_ports = await start_json_server("standin", log_dir)
        procs.append(standin)
        bare, bare_ports = await start_json_server("bare", log_dir)
        procs.append(bare)
        standin_port = int(standin_ports["http_port"])
        bare_http_port = int(bare_ports["http_port"])

        async def service(name: str, **env: str) -> ServiceProc:
            proc = await start_service(
                name, standin_port, STANDIN_API_KEY, SERVICE_AGENT["id"], log_dir, **env
            )
            procs.append(proc)
            return proc

        svc = await service("service-sqlite")

        async def beside_bare(proc: ServiceProc, count: int, label: str) -> dict[str, Any]:
            # The service (``label``) and the bare grpc.aio server, taking turns, on ``count``
            # streams each.
            ids, visitors = await open_handoffs(proc, count, f"w2s-{label}-{count}")
            ours, base = await webhook_to_stream(
                [
                    service_target(proc, ids, visitors, f"{label}-{count}"),
                    bare_target(bare, bare_ports, count),
                ],
                sizes,
                log_dir,
            )
            say(
                f"   {count} streams: {label} p50 {ours['p50_ms']} ms p99 {ours['p99_ms']} ms "
                f"{ours['events_per_s']}/s; bare p50 {base['p50_ms']} ms {base['events_per_s']}/s"
            )
            return {"streams": count, "service": ours, "bare": base}

        say("1. webhook -> stream, service (SQLite) and bare grpc.aio")
        results["webhook_to_stream"] = [
            await beside_bare(svc, count, "service") for count in sizes.stream_counts
        ]
        top = max(sizes.stream_counts)
        say(f"1b. webhook -> stream at {top} streams, the service on grpclib and bare grpc.aio")
        lib = await service("service-grpclib", GRPC_SERVER="grpclib")
        results["webhook_to_stream_grpclib"] = await beside_bare(lib, top, "service-grpclib")
        await lib.stop()

        say("2. webhook ingest, service (SQLite) and a bare Starlette route, taking turns")
        ids, visitors = await open_handoffs(svc, 50, "ingest")
        ours_load, base_load = await ingest_side_by_side(
            [
                (svc.http_port, lambda n: svc.webhook_path, visitors, svc),
                (bare_http_port, lambda n: "/ok", visitors, bare),
            ],
            sizes,
        )
        ours_ingest, base_ingest = ingest_figures(ours_load), ingest_figures(base_load)
        results["ingest"] = {"service": ours_ingest, "bare": base_ingest}
        say(f"   service {ours_ingest['per_s']}/s; bare {base_ingest['per_s']}/s")

        say("3. SendMessage -> Brevo stand-in, httpx posting the same body directly, taking turns")
        send_ids, _ = await open_handoffs(svc, sizes.send_concurrency, "send")
        results["send_message"] = send = await send_side_by_side(
            svc, send_ids, standin_port, f"127.0.0.1:{bare_ports['grpc_port']}", sizes
        )
        say(
            f"   SendMessage p50 {send['service']['p50_ms']} ms; direct p50 "
            f"{send['direct']['p50_ms']} ms; a bare gRPC unary call p50 "
            f"{send['grpc_hop']['p50_ms']} ms"
        )

        say("4. idle streams: resident memory per stream")

        async def idle_handoffs(proc: ServiceProc) -> list[str]:
            # Ten handoffs of one agent message each: every idle stream replays it as its
            # first item.
            ids, visitors = await open_handoffs(proc, 10, "idle")
            warm_up = service_target(proc, ids, visitors, "idle").warm_up
            assert warm_up is not None
            await warm_up()
            return ids

        idle_ids = await idle_handoffs(svc)
        idle = []

        async def baseline_idle(proc: Proc, ports: dict[str, Any], count: int) -> dict[str, Any]:
            # A baseline server knows no handoffs: any ids do.
            target = f"127.0.0.1:{ports['grpc_port']}"
            ids = [f"idle-{n}" for n in range(10)]
            return await idle_streams(proc, target, ids, count, log_dir)

        async def new_service_idle(count: int, grpc_server: str) -> dict[str, Any]:
            # What a replica pays when the streams come to a new process (after a rollout,
            # say): no memory freed by earlier work to reuse, as for the floor.
            fresh = await service(f"service-idle-{grpc_server}-{count}", GRPC_SERVER=grpc_server)
            try:
                ids = await idle_handoffs(fresh)
                return await idle_streams(fresh, fresh.grpc_target, ids, count, log_dir)
            finally:
                await fresh.stop()

        for count in sizes.idle_counts:
            ours_idle = await idle_streams(svc, svc.grpc_target, idle_ids, count, log_dir)
            ours_new_idle = await new_service_idle(count, "grpcio")
            ours_grpclib_idle = await new_service_idle(count, "grpclib")
            base_idle = await baseline_idle(bare, bare_ports, count)
            # A new floor for each count: what its streams cost a process that has kept
            # nothing from any before them.
            floor, floor_ports = await start_json_server(f"floor-{count}", log_dir, "floor")
            try:
                floor_idle = await baseline_idle(floor, floor_ports, count)
            finally:
                await floor.stop()
            idle.append(
                {
                    "streams": count,
                    "service": ours_idle,
                    "service_new": ours_new_idle,
                    "service_new_grpclib": ours_grpclib_idle,
                    "bare": base_idle,
                    "floor": floor_idle,
                }
            )
            say(
                f"   {count}: service {ours_idle['kib_per_stream']} KiB/stream, "
                f"{ours_new_idle['kib_per_stream']} on a new process, "
                f"{ours_grpclib_idle['kib_per_stream']} on a new one on grpclib; "
                f"bare {base_idle['kib_per_stream']} KiB/stream; "
                f"floor {floor_idle['kib_per_stream']} KiB/stream"
            )
        results["idle_streams"] = idle

        say("5. Redis: one replica, then webhooks on replica A and streams on replica B")
        redis = RedisProc(log_dir / "redis")
        await redis.start()
        one = await service("service-redis-a", REDIS_URL=redis.url)
        # SQLite again, taking turns with Redis: section 1's run was minutes ago, and the
        # machine's speed drifts more than that in a few minutes.
        ids, visitors = await open_handoffs(svc, sizes.redis_streams, "sqlite-beside-redis")
        redis_ids, redis_visitors = await open_handoffs(one, sizes.redis_streams, "redis")
        sqlite_same, redis_w2s = await webhook_to_stream(
            [
                service_target(svc, ids, visitors, "sqlite-beside-redis"),
                service_target(one, redis_ids, redis_visitors, "redis-1"),
            ],
            sizes,
            log_dir,
        )
        ids, visitors = await open_handoffs(one, 50, "redis-ingest")
        _, sqlite_visitors = await open_handoffs(svc, 50, "sqlite-ingest")
        redis_load, sqlite_load = await ingest_side_by_side(
            [
                (one.http_port, lambda n: one.webhook_path, visitors, one),
                (svc.http_port, lambda n: svc.webhook_path, sqlite_visitors, svc),
            ],
            sizes,
        )
        redis_ingest, sqlite_ingest = ingest_figures(redis_load), ingest_figures(sqlite_load)
        two = await service("service-redis-b", REDIS_URL=redis.url)
        ids, visitors = await open_handoffs(one, sizes.redis_streams, "redis-2")
        cross = service_target(one, ids, visitors, "redis-2")
        cross.grpc_target = two.grpc_target  # streams on B, webhooks on A
        [redis_cross] = await webhook_to_stream([cross], sizes, log_dir)
        results["redis"] = {
            "streams": sizes.redis_streams,
            "one_replica": redis_w2s,
            "two_replicas": redis_cross,
            "ingest": redis_ingest,
            "sqlite_ingest": sqlite_ingest,  # measured taking turns with Redis'
            "sqlite_same_streams": sqlite_same,  # taking turns with Redis' one replica
        }
        say(
            f"   SQLite {sqlite_same['events_per_s']}/s, Redis beside it: one replica "
            f"{redis_w2s['events_per_s']}/s p99 {redis_w2s['p99_ms']} ms; "
            f"two replicas p99 {redis_cross['p99_ms']} ms; ingest {redis_ingest['per_s']}/s"
        )
    finally:
        for proc in reversed(procs):
            await proc.stop()
        if redis is not None:
            await redis.stop()
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--out", default=str(REPO / "docs" / "bench"), help="where results go")
    args = parser.parse_args(argv)
    out = Path(args.out)
    log_dir = REPO / "build" / ("bench-quick" if args.quick else "bench") / "logs"
    sizes = QUICK if args.quick else FULL
    shutil.rmtree(log_dir, ignore_errors=True)  # this run's logs only
    started = time.monotonic()
    results = asyncio.run(run(sizes, log_dir))
    results["duration_s"] = round(time.monotonic() - started, 1)
    results["quick"] = args.quick
    checks = report.write(results, out)
    say(f"wrote {out}/results.json, results.md and latency.png in {results['duration_s']} s")
    for check in checks:
        say(f"   {'met   ' if check['met'] else 'MISSED'} {check['what']}: {check['figure']}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
