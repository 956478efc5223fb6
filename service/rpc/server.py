"""The gRPC server factory: main() and every test start the server through it."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from service.core.access import TokenSet
from service.core.handoffs import HandoffManager
from service.rpc.auth import BearerAuth
from service.rpc.generated.handoff.v1 import handoff_pb2 as pb
from service.rpc.generated.handoff.v1 import handoff_pb2_grpc as pb_grpc
from service.rpc.health import HealthReporter
from service.rpc.malformed import RejectMalformed
from service.rpc.servicer import CallsInFlight, HandoffServicer

log = logging.getLogger(__name__)

HANDOFF_SERVICE = pb.DESCRIPTOR.services_by_name["HandoffService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

MAX_PENDING_CALLS = 20_000
MAX_REQUEST_BYTES = 4 * 1024 * 1024
# Clients may ping every 10 s on idle connections without being sent GOAWAY.
MIN_CLIENT_PING_INTERVAL_S = 10
# Idle clients are pinged every 30 s so dead peers are noticed and streams released.
KEEPALIVE_TIME_S = 30
KEEPALIVE_TIMEOUT_S = 10

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_S * 1000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_S * 1000),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_S * 1000),
    ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
    # Fail to start rather than silently share the port with another process.
    ("grpc.so_reuseport", 0),
    # Calls that arrived but that the event loop has not taken up yet: by default gRPC
    # cancels some of them past 1,000 and all of them past 3,000, which a rollout's burst
    # of reconnecting streams reaches (tests/reliability/test_reconnect_burst.py). The
    # bound here is twice the 10,000 streams a process is sized for; a call still waits
    # no more than 30 s to be taken up (gRPC's default), and each waiting one is small.
    ("grpc.server.max_pending_requests", MAX_PENDING_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", MAX_PENDING_CALLS),
]


def server_options(
    max_connection_age_s: float, max_connection_age_grace_s: float
) -> list[tuple[str, int]]:
    """SERVER_OPTIONS plus a maximum connection age (0: none).

    gRPC closes a connection after about ``max_connection_age_s`` (with ±10% jitter, so
    that replicas do not all see their clients come back at once); calls on it may go on
    for ``max_connection_age_grace_s`` more. Long-lived streams thereby spread over the
    replicas again after a rollout or a scale-up.
    """
    options = list(SERVER_OPTIONS)
    if max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", int(max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(max_connection_age_grace_s * 1000)),
        ]
    return options


@dataclass(frozen=True)
class TlsSettings:
    """PEM contents. With ``client_ca`` set, clients must present a certificate it signed."""

    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )


@dataclass
class GrpcServer:
    server: grpc.aio.Server
    port: int
    health: HealthReporter
    calls: CallsInFlight

    async def stop(self, grace_s: float) -> None:
        """Refuses new calls at once; lets the unary calls in flight (a SendMessage waiting
        on Brevo) finish within ``grace_s``, then ends whatever is still open.

        Server streams do not count: reply streams have already been ended by the drain,
        and a health Watch never ends by itself, so waiting for it would always cost the
        whole grace period.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        stopping = asyncio.create_task(self.server.stop(grace_s))
        await self.calls.wait_idle(grace_s)
        await self.server.stop(0)
        await stopping
        # A call cut just now (it arrived as the drain began) still finishes its work, so
        # that its client's retry finds it done rather than doing it twice.
        if not await self.calls.wait_idle(max(deadline - loop.time(), 0.0)):
            log.warning("%d call(s) still running after %g s", self.calls.count, grace_s)


async def create_server(
    manager: HandoffManager,
    host: str,
    port: int,
    *,
    max_connection_age_s: float = 0,
    max_connection_age_grace_s: float = 0,
    auth: TokenSet | None = None,
    tls: TlsSettings | None = None,
) -> GrpcServer:
    """Builds and starts the server on ``host:port`` (0 picks a free port).

    Besides HandoffService it serves grpc.health.v1 (the caller keeps the returned reporter
    up to date) and server reflection, for grpcurl, ``buf curl`` and grpc-health-probe.
    """
    server = grpc.aio.server(
        options=server_options(max_connection_age_s, max_connection_age_grace_s),
        # Authentication first: an unauthenticated caller learns nothing, not even whether
        # its request parsed.
        interceptors=[*([BearerAuth(auth)] if auth else []), RejectMalformed()],
    )
    servicer = HandoffServicer(manager)
    pb_grpc.add_HandoffServiceServicer_to_server(servicer, server)
    health = HealthReporter((HANDOFF_SERVICE,))
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    reflection.enable_server_reflection(
        (HANDOFF_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server
    )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, tls.credentials())
    if bound == 0:
        raise OSError(f"could not bind the gRPC port {address}")
    await server.start()
    return GrpcServer(server, bound, health, servicer.calls)
