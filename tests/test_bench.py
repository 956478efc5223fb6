"""The benchmark's smoke run: ``python -m bench --quick`` end to end, as ``make bench`` runs
it but on small sizes. Its figures mean nothing; what is checked is that every scenario ran
against real processes, lost nothing, and wrote its three outputs."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from log_audit import audit_output

from bench import grpc_floor, processes
from bench.processes import WEBHOOK_TOKEN
from bench.servers import STANDIN_API_KEY
from service.rpc.generated.handoff.v1 import handoff_pb2 as pb

REPO = Path(__file__).resolve().parents[1]
# The bench's secrets, named here so that the log audit looks for them in its logs.
BENCH_WEBHOOK_TOKEN = WEBHOOK_TOKEN
BENCH_API_KEY = STANDIN_API_KEY


def _run_quick(module: str, out: Path, timeout_s: float) -> None:
    """``python -m MODULE --quick --out OUT``, which must succeed."""
    done = subprocess.run(  # noqa: S603 (fixed arguments)
        [sys.executable, "-m", module, "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _audit_logs(label: str, folder: Path, expected: set[str]) -> None:
    """The logs in ``folder``, at least those ``expected`` (by name), into the log audit."""
    logs = sorted(folder.glob("*.log"))
    assert {p.stem for p in logs} >= expected
    for log in logs:
        audit_output(f"{label} {log.stem}", log.read_text(errors="replace"))


@pytest.mark.timeout(300)
def test_quick_bench_runs_every_scenario_and_writes_its_outputs(tmp_path: Path) -> None:
    _run_quick("bench", tmp_path, timeout_s=280)
    # Every process the bench started logged to build/bench-quick/logs.
    _audit_logs(
        "bench",
        REPO / "build" / "bench-quick" / "logs",
        {"standin", "bare", "floor-100", "service-sqlite", "service-grpclib", "service-redis-a"},
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["quick"] is True

    for row in results["webhook_to_stream"]:
        for name in ("service", "bare"):
            f = row[name]
            # Every message posted reached its stream, every post was answered 200.
            assert f["rate_statuses"] == {"200": f["rate_posted"]}, (row["streams"], name, f)
            assert f["rate_delivered"] == f["rate_posted"], (row["streams"], name, f)
            assert f["latency_messages"] == f["latency_posted"], (row["streams"], name, f)
            assert f["stream_errors"] == 0
            assert 0 < f["p50_ms"] <= f["p99_ms"]
            # The sustained rate took turns with its baseline, round by round.
            assert f["rate_rounds"] == results["sizes"]["rounds"] == 2
    assert [r["streams"] for r in results["webhook_to_stream"]] == [1, 10]
    lib = results["webhook_to_stream_grpclib"]
    assert lib["streams"] == 10
    for name in ("service", "bare"):
        f = lib[name]
        assert f["rate_statuses"] == {"200": f["rate_posted"]}, (name, f)
        assert f["rate_delivered"] == f["rate_posted"], (name, f)
        assert f["latency_messages"] == f["latency_posted"], (name, f)
        assert f["stream_errors"] == 0
    for name in ("service", "bare"):
        ingest = results["ingest"][name]
        assert ingest["statuses"] == {"200": ingest["requests"]}, ingest
        assert ingest["server_cpu_us_per_request"] > 0, ingest
        # Each round is reported on its own too, and they add up to the whole.
        assert len(ingest["rounds"]) == results["sizes"]["rounds"] == 2, ingest
        assert all(one["per_s"] > 0 for one in ingest["rounds"]), ingest
        assert sum(one["acknowledged"] for one in ingest["rounds"]) == ingest["acknowledged"]
        # The whole is the rounds' mean, weighted by time and by requests: within their range.
        for figure in ("per_s", "server_cpu_us_per_request"):
            each = [one[figure] for one in ingest["rounds"]]
            assert min(each) - 0.1 <= ingest[figure] <= max(each) + 0.1, (figure, ingest)
    for name in ("service", "direct"):
        send = results["send_message"][name]
        assert send["sequential_calls"] == 30
        assert send["concurrent_calls"] > 0
    # The four kinds of call took turns: as many of each.
    for name in ("direct_aiohttp", "grpc_hop"):
        assert results["send_message"][name]["sequential_calls"] == 30
    for row in results["idle_streams"]:
        # Counted by the clients: the streams still open once each had its first item.
        for name in ("service", "service_new", "service_new_grpclib", "bare", "floor"):
            assert row[name]["streams"] == 100, row
            assert row[name]["errors"] == [], row
    redis = results["redis"]
    for name in ("sqlite_same_streams", "one_replica", "two_replicas"):
        assert redis[name]["rate_delivered"] == redis[name]["rate_posted"] > 0
        assert redis[name]["stream_errors"] == 0
    for name in ("ingest", "sqlite_ingest"):  # measured taking turns
        assert redis[name]["requests"] > 0
        assert redis[name]["statuses"] == {"200": redis[name]["requests"]}

    # Every target of the issue is judged, and the outputs exist.
    whats = [t["what"] for t in results["targets"]]
    assert len(whats) == 14, whats
    table = (tmp_path / "results.md").read_text()
    assert "--quick smoke run" in table
    assert all(what in table for what in whats)
    assert (tmp_path / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_floor_sends_the_contract_s_heartbeat_on_the_contract_s_path() -> None:
    """bench/grpc_floor.py imports neither stubs nor protobuf (any grpcio release runs it):
    its first item and method path, spelt out there, are the contract's."""
    heartbeat = pb.StreamAgentRepliesResponse(heartbeat=pb.Heartbeat()).SerializeToString()
    assert heartbeat == grpc_floor.HEARTBEAT
    service = pb.DESCRIPTOR.services_by_name["HandoffService"]
    assert f"/{service.full_name}/StreamAgentReplies" == grpc_floor.METHOD


@pytest.mark.timeout(120)
def test_the_floor_measures_a_new_server_s_memory_per_open_stream_and_python_s_share() -> None:
    done = subprocess.run(  # noqa: S603 (fixed arguments)
        [
            sys.executable,
            str(REPO / "bench" / "grpc_floor.py"),
            "--streams",
            "200",
            "--python-share",
        ],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout)
    assert figures["grpcio"] == grpc.__version__
    assert (figures["requested"], figures["streams"]) == (200, 200)
    assert figures["rss_with_streams_mib"] > figures["rss_before_mib"] > 0
    assert figures["kib_per_stream"] > 0
    # grpc.aio's objects for a call, counted on a second server: a part of the whole.
    assert figures["python_streams"] == 200
    assert 0 < figures["python_kib_per_stream"] < figures["kib_per_stream"]


def test_ports_handed_to_processes_lie_below_the_ephemeral_range_and_never_repeat() -> None:
    """An ephemeral port (what bind(0) gives) can be taken by any process's outgoing
    connection before the process told to listen on it binds it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [processes.free_port() for _ in range(200)]
    assert len(set(ports)) == 200
    assert all(10_000 <= port < low for port in ports)
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))  # free when handed out, and still


@pytest.mark.timeout(240)
def test_the_transports_comparison_measures_both_servers_on_every_count(tmp_path: Path) -> None:
    """``python -m bench.transports --quick``: the service's stream on grpc.aio and on
    grpclib, each transport's floor, a unary call, the service's SendMessage and pushed
    messages, all over loopback."""
    _run_quick("bench.transports", tmp_path, timeout_s=220)
    # Every process it started logged to build/bench-quick/transports-logs, emptied first.
    _audit_logs(
        "bench.transports",
        REPO / "build" / "bench-quick" / "transports-logs",
        {
            "service-aio-100",
            "service-grpclib-100",
            "service-send",
            "grpclib-floor-100",
            "bare-aio",
            "bare-grpclib",
        },
    )
    results = json.loads((tmp_path / "transports.json").read_text())
    assert results["quick"] is True
    assert results["grpcio"] == grpc.__version__
    idle = results["idle"]["100"]
    assert set(idle) == {"service_aio", "service_grpclib", "floor_aio", "floor_grpclib"}
    for name in ("service_aio", "service_grpclib", "floor_grpclib"):
        assert (idle[name]["requested"], idle[name]["streams"], idle[name]["errors"]) == (
            100,
            100,
            [],
        ), name
        assert idle[name]["rss_with_streams_mib"] > idle[name]["rss_before_mib"] > 0, name
    assert (idle["floor_aio"]["requested"], idle["floor_aio"]["streams"]) == (100, 100)
    for kind in ("aio", "grpclib"):
        assert results["unary"][kind]["calls"] == 100
        # Every SendMessage reached the sandbox (send() checks each answer's message id).
        assert results["send"][kind]["calls"] == 100
        assert results["send"][kind]["p50_ms"] > 0
        assert results["unary"][kind]["p50_ms"] > 0
        # Every pushed message arrived, and was the one pushed (drain() compares bytes).
        assert results["push"][kind]["messages"] == 50 * 4 * 2
        assert results["push"][kind]["received"] == 50 * 4 * 2
