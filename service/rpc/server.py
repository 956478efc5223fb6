"""The gRPC server factory: main() and every test start the server through it."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.core.handoffs import HandoffManager
from service.rpc.generated.handoff.v1 import handoff_pb2 as pb
from service.rpc.generated.handoff.v1 import handoff_pb2_grpc as pb_grpc
from service.rpc.health import HealthReporter
from service.rpc.servicer import HandoffServicer

HANDOFF_SERVICE = pb.DESCRIPTOR.services_by_name["HandoffService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

SERVER_OPTIONS: list[tuple[str, int]] = [
    # Let clients ping every 10 s on idle connections without being sent GOAWAY.
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # Ping idle clients every 30 s so dead peers are noticed and streams released.
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
]


async def create_server(
    manager: HandoffManager, host: str, port: int
) -> tuple[grpc.aio.Server, int, HealthReporter]:
    """Builds and starts the server on ``host:port`` (0 picks a free port).

    Besides HandoffService it serves grpc.health.v1 (the caller keeps the returned reporter
    up to date) and server reflection, for grpcurl, ``buf curl`` and grpc-health-probe.
    Returns the server, its port and the health reporter.
    """
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_HandoffServiceServicer_to_server(HandoffServicer(manager), server)
    health = HealthReporter((HANDOFF_SERVICE,))
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(
        (HANDOFF_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server
    )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"could not bind the gRPC port {address}")
    await server.start()
    return server, bound, health
