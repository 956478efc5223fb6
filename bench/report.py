"""The benchmark's outputs: ``results.json`` (every figure), ``results.md`` (the table the
README links, each figure beside its baseline, the ratio and the target) and
``latency.png`` (webhook-to-stream latency curves)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def ratio(ours: float, base: float) -> float:
    return round(ours / base, 3) if base and not math.isnan(base) else float("nan")


# Section 4's servers, as results.json names them and as results.md shows them.
IDLE_ROWS = (
    ("service", "service"),
    ("service_new", "service, new process"),
    ("service_new_grpclib", "service on grpclib, new process"),
    ("bare", "bare"),
    ("floor", "floor"),
)


def checks(r: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target of the benchmark issue, with the figure it is judged on."""
    found: list[dict[str, Any]] = []

    def check(what: str, figure: str, met: bool) -> None:
        found.append({"what": what, "figure": figure, "met": bool(met)})

    top = max(r["webhook_to_stream"], key=lambda row: row["streams"])
    ours, base = top["service"], top["bare"]
    n = top["streams"]
    check(
        f"webhook -> stream p50 <= 5 ms at {n} streams", f"{ours['p50_ms']} ms", ours["p50_ms"] <= 5
    )
    check(
        f"webhook -> stream p99 <= 25 ms at {n} streams",
        f"{ours['p99_ms']} ms",
        ours["p99_ms"] <= 25,
    )
    check(
        f"sustained >= 2,000 events/s at {n} streams",
        f"{ours['events_per_s']} events/s",
        ours["events_per_s"] >= 2000,
    )
    rate_ratio = ratio(ours["events_per_s"], base["events_per_s"])
    check(
        f"webhook -> stream rate >= 50% of bare grpc.aio at {n} streams",
        f"{rate_ratio:.0%} ({ours['events_per_s']} vs {base['events_per_s']} events/s)",
        rate_ratio >= 0.5,
    )
    lib = r["webhook_to_stream_grpclib"]
    ours, base = lib["service"], lib["bare"]
    lib_ratio = ratio(ours["events_per_s"], base["events_per_s"])
    check(
        f"GRPC_SERVER=grpclib: webhook -> stream p50 <= 5 ms and p99 <= 25 ms at "
        f"{lib['streams']} streams",
        f"p50 {ours['p50_ms']} ms, p99 {ours['p99_ms']} ms",
        ours["p50_ms"] <= 5 and ours["p99_ms"] <= 25,
    )
    check(
        f"GRPC_SERVER=grpclib: sustained >= 2,000 events/s and >= 50% of bare grpc.aio at "
        f"{lib['streams']} streams",
        f"{ours['events_per_s']} events/s, {lib_ratio:.0%} of {base['events_per_s']}",
        ours["events_per_s"] >= 2000 and lib_ratio >= 0.5,
    )
    ingest = r["ingest"]
    ingest_ratio = ratio(ingest["service"]["per_s"], ingest["bare"]["per_s"])
    check(
        "ingest >= 50% of a bare Starlette route",
        f"{ingest_ratio:.0%} ({ingest['service']['per_s']} vs {ingest['bare']['per_s']}/s; "
        f"{ingest['service']['server_cpu_us_per_request']} vs "
        f"{ingest['bare']['server_cpu_us_per_request']} µs of server CPU a request)",
        ingest_ratio >= 0.5,
    )
    send = r["send_message"]
    added = round(send["service"]["p50_ms"] - send["direct"]["p50_ms"], 3)
    over = round(send["service"]["p50_ms"] - send["direct_aiohttp"]["p50_ms"], 3)
    check(
        "SendMessage adds <= 1 ms p50 over a direct httpx post",
        f"+{added} ms; a bare gRPC round trip is {send['grpc_hop']['p50_ms']} ms, and over "
        f"a direct aiohttp post (the service's own HTTP client) +{over} ms",
        added <= 1,
    )
    for row in r["idle_streams"]:
        # Judged on a new process: what a replica pays when the streams come to it after a
        # rollout, and what the floor (a new process too) is measured on. The service that
        # served the sections before reuses memory they freed, the more so the fewer streams.
        lib_kib = row["service_new_grpclib"]["kib_per_stream"]
        check(
            f"GRPC_SERVER=grpclib: <= 20 KiB per idle stream at {row['streams']}",
            f"{lib_kib} KiB on a new service process on grpclib",
            lib_kib <= 20,
        )
        kib = row["service_new"]["kib_per_stream"]
        check(
            f"GRPC_SERVER=grpcio (the default): <= 20 KiB per idle stream at {row['streams']}",
            f"{kib} KiB on a new service process ({row['service']['kib_per_stream']} KiB on "
            "the one that served the sections before); a grpc.aio server keeping nothing for "
            f"a stream {row['floor']['kib_per_stream']} KiB, the bare grpc.aio server "
            f"{row['bare']['kib_per_stream']} KiB",
            kib <= 20,
        )
    biggest = max(r["idle_streams"], key=lambda row: row["streams"])
    opened = min(biggest[name]["streams"] for name, _ in IDLE_ROWS if name.startswith("service"))
    check("10,000 idle streams on one process", f"{opened} streams open", opened >= 10_000)
    redis = r["redis"]
    rr = ratio(redis["one_replica"]["events_per_s"], redis["sqlite_same_streams"]["events_per_s"])
    check(
        f"Redis webhook -> stream rate >= 50% of SQLite's at {redis['streams']} streams",
        f"{rr:.0%} ({redis['one_replica']['events_per_s']} vs "
        f"{redis['sqlite_same_streams']['events_per_s']} events/s)",
        rr >= 0.5,
    )
    sqlite_ingest = redis["sqlite_ingest"]
    ir = ratio(redis["ingest"]["per_s"], sqlite_ingest["per_s"])
    check(
        "Redis ingest >= 50% of SQLite's",
        f"{ir:.0%} ({redis['ingest']['per_s']} vs {sqlite_ingest['per_s']}/s)",
        ir >= 0.5,
    )
    cross = redis["two_replicas"]["p99_ms"]
    check("cross-replica webhook -> stream p99 <= 30 ms", f"{cross} ms", cross <= 30)
    return found


def markdown(r: dict[str, Any], found: list[dict[str, Any]]) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"`make bench` on {r['started']}: {r['machine']['cpus']} CPUs, Python "
        f"{r['machine']['python']}, {r['duration_s']} s"
        + (" (**--quick smoke run: these figures mean nothing**)" if r.get("quick") else "")
        + ". Every process (the service, its baseline, the stand-in Brevo, the stream clients "
        "and the load driver) shares the same machine; each ratio compares runs made in the "
        "same run, with the same driver and clients. Sustained-rate and ingest runs take "
        f"turns with their baseline, {r['sizes']['rounds']} rounds of "
        f"{r['sizes']['rate_s']} s and {r['sizes']['ingest_s']} s each, and SendMessage calls "
        "with theirs, call by call, so that a noisy neighbour strikes both alike.",
        "",
        "## Targets",
        "",
        "| target | figure | |",
        "|---|---|---|",
        *(
            f"| {c['what']} | {c['figure']} | {'met' if c['met'] else '**missed**'} |"
            for c in found
        ),
        "",
        "## 1. Webhook to stream",
        "",
        "A fragment posted to the gateway until its `AgentMessage` is read from a "
        "`StreamAgentReplies` stream, each stream following a handoff of its own, webhooks "
        "round-robin over them. Baseline: a bare `grpc.aio` server streaming a pre-built "
        "message per `POST` to a bare Starlette route (same uvicorn set-up, same clients). "
        "Latency at a steady offered rate; the rate with "
        f"{r['sizes']['rate_connections']} connections posting as fast as answers come.",
        "",
        "| streams | | p50 ms | p99 ms | events/s | server CPU µs/event | server RSS MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["webhook_to_stream"]:
        for name in ("service", "bare"):
            f = row[name]
            lines.append(
                f"| {row['streams']} | {name} | {f['p50_ms']} | {f['p99_ms']} | "
                f"{f['events_per_s']} | {f['server_cpu_us_per_event']} | {f['server_rss_mib']} |"
            )
        lines.append(
            f"| {row['streams']} | ratio | | | "
            f"{ratio(row['service']['events_per_s'], row['bare']['events_per_s']):.0%} | | |"
        )
    lib = r["webhook_to_stream_grpclib"]
    lines += [
        "",
        f"At {lib['streams']} streams again, with the service on grpclib "
        "(`GRPC_SERVER=grpclib`), taking turns with the same bare server:",
        "",
        "| streams | | p50 ms | p99 ms | events/s | server CPU µs/event | server RSS MiB |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {lib['streams']} | {label} | {f['p50_ms']} | {f['p99_ms']} | "
            f"{f['events_per_s']} | {f['server_cpu_us_per_event']} | {f['server_rss_mib']} |"
            for label, f in (("service on grpclib", lib["service"]), ("bare", lib["bare"]))
        ),
        f"| {lib['streams']} | ratio | | | "
        f"{ratio(lib['service']['events_per_s'], lib['bare']['events_per_s']):.0%} | | |",
    ]
    ingest = r["ingest"]
    send = r["send_message"]
    lines += [
        "",
        "## 2. Webhook ingest",
        "",
        "Fragments acknowledged per second (stored: the answer comes after the commit), no "
        "stream open; baseline: a Starlette route that reads the body and answers 200.",
        "",
        "| | per s | p50 ms | p99 ms | server CPU µs/request |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {ingest[name]['per_s']} | {ingest[name]['p50_ms']} | "
            f"{ingest[name]['p99_ms']} | {ingest[name]['server_cpu_us_per_request']} |"
            for name in ("service", "bare")
        ),
        f"| ratio | {ratio(ingest['service']['per_s'], ingest['bare']['per_s']):.0%} | | | |",
        "",
        "Round by round, taking turns (per s, and server CPU µs a request): the service's "
        "store grows from each round to the next.",
        "",
        *(
            f"- {name}: "
            + ", ".join(
                f"{one['per_s']}/s ({one['server_cpu_us_per_request']} µs)"
                for one in ingest[name]["rounds"]
            )
            for name in ("service", "bare")
        ),
        "",
        "## 3. SendMessage to Brevo",
        "",
        "Against the stand-in Brevo answering at once; baseline: httpx posting the same body "
        "to it directly; for reference, aiohttp posting it (the client the service uses "
        "itself) and a unary call to the bare grpc.aio server. p50/p99 one call at a time, "
        "the four taking turns; calls/s with "
        f"{r['sizes']['send_concurrency']} callers.",
        "",
        "| | p50 ms | p99 ms | calls/s |",
        "|---|---|---|---|",
        *(
            f"| {name} | {send[name]['p50_ms']} | {send[name]['p99_ms']} | "
            f"{send[name]['calls_per_s']} |"
            for name in ("service", "direct")
        ),
        f"| direct, aiohttp | {send['direct_aiohttp']['p50_ms']} | "
        f"{send['direct_aiohttp']['p99_ms']} | |",
        f"| a bare gRPC unary call (the hop alone) | {send['grpc_hop']['p50_ms']} | "
        f"{send['grpc_hop']['p99_ms']} | |",
        "",
        "## 4. Idle streams",
        "",
        "Resident memory of the server process with the streams open, over none, per stream "
        "open: those the clients still hold once every stream has had its first item. The "
        "service and the bare server have served the sections before, and their allocators "
        "reuse what they kept from them first. A new service process for each count has "
        "nothing to reuse: what a replica pays when the streams come to it after a rollout; "
        "the target is judged on it, for each gRPC server the service offers "
        "(`GRPC_SERVER`: grpc.aio, the default, and grpclib). The floor is a grpc.aio "
        "server that keeps nothing of "
        "its own for a stream (bench/grpc_floor.py), a new process for each count too: what "
        "an idle stream costs gRPC alone.",
        "",
        "| streams requested | | open | KiB per stream | RSS before MiB | with streams MiB |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["idle_streams"]:
        for name, label in IDLE_ROWS:
            f = row[name]
            lines.append(
                f"| {row['streams']} | {label} | {f['streams']} | {f['kib_per_stream']} | "
                f"{f['rss_before_mib']} | {f['rss_with_streams_mib']} |"
            )
    redis = r["redis"]
    lines += [
        "",
        "## 5. Redis",
        "",
        f"{redis['streams']} streams, SQLite measured again taking turns with Redis. Two "
        "replicas: webhooks to replica A, streams on replica B, one Redis (append-only "
        "file, fsync every second).",
        "",
        "| | p50 ms | p99 ms | events/s |",
        "|---|---|---|---|",
    ]
    rows = [
        ("SQLite", redis["sqlite_same_streams"]),
        ("Redis, one replica", redis["one_replica"]),
        ("Redis, two replicas", redis["two_replicas"]),
    ]
    for name, f in rows:
        lines.append(f"| {name} | {f['p50_ms']} | {f['p99_ms']} | {f['events_per_s']} |")
    lines += [
        "",
        f"Ingest on Redis: {redis['ingest']['per_s']}/s; on SQLite, taking turns with it: "
        f"{redis['sqlite_ingest']['per_s']}/s.",
        "",
        "![webhook to stream latency](latency.png)",
        "",
    ]
    return "\n".join(lines)


def plot(r: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for row in r["webhook_to_stream"]:
        for name, style in (("service", "-"), ("bare", ":")):
            cdf = row[name]["latency_cdf_ms"]
            if cdf:
                quantiles = [i / (len(cdf) - 1) for i in range(len(cdf))]
                ax.plot(cdf, quantiles, style, label=f"{name}, {row['streams']} streams")
    for name in ("one_replica", "two_replicas"):
        cdf = r["redis"][name]["latency_cdf_ms"]
        if cdf:
            quantiles = [i / (len(cdf) - 1) for i in range(len(cdf))]
            label = f"Redis {name.replace('_', ' ')}, {r['redis']['streams']} streams"
            ax.plot(cdf, quantiles, "--", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("webhook posted -> AgentMessage read (ms, log scale)")
    ax.set_ylabel("fraction of messages")
    ax.set_title("Webhook to stream latency (CDF)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write(r: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    found = checks(r)
    r["targets"] = found
    (out / "results.json").write_text(json.dumps(r, indent=1, sort_keys=True) + "\n")
    (out / "results.md").write_text(markdown(r, found))
    plot(r, out / "latency.png")
    return found


if __name__ == "__main__":
    # python -m bench.report DIR: writes results.md and latency.png again from results.json.
    import sys

    folder = Path(sys.argv[1])
    write(json.loads((folder / "results.json").read_text()), folder)
