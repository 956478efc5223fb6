"""The gRPC server on grpclib (``GRPC_SERVER=grpclib``): the same contract, less memory.

grpclib is a gRPC server in pure Python on the h2 library. An idle reply stream costs it
about 18 KiB, against about 29 on grpc.aio, whose C core alone takes 17 (``make
bench-transports``); a unary call costs it more CPU. It serves the very servicers grpc.aio
serves (``grpclib_adapter``); this module gives it what grpc.aio's server options give the
other one and grpclib lacks:

- a bound on the streams of one connection, announced in the connection's first SETTINGS
  (h2 announces 100, which a client multiplexing its streams would queue behind);
- keepalive pings to idle clients, and a limit on the pings a client may send;
- a maximum connection age, with jitter and a grace period, ended by a GOAWAY that lets the
  calls on the connection finish (h2 closes its side of a connection with its GOAWAY, so the
  frame is written here);
- a graceful stop: GOAWAY on every connection, unary calls finish within the grace, then
  whatever is still open is ended.

grpclib and h2 are pinned: some of this reaches into their internals, named where it does.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2
from grpclib.config import Configuration
from grpclib.const import Cardinality, Handler
from grpclib.protocol import Connection, EventsProcessor, H2Protocol
from grpclib.server import Server, Stream
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import PingReceived
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from service.core import errors
from service.core.access import TokenSet
from service.core.handoffs import HandoffManager
from service.rpc.generated.handoff.v1 import handoff_pb2 as pb
from service.rpc.grpclib_adapter import (
    EndsOnStop,
    Mapping,
    read_request,
    servicer_handlers,
    status_error,
)
from service.rpc.health import HealthReporter
from service.rpc.server import (
    HANDOFF_SERVICE,
    HEALTH_SERVICE,
    KEEPALIVE_TIME_S,
    KEEPALIVE_TIMEOUT_S,
    MAX_PENDING_CALLS,
    MAX_REQUEST_BYTES,
    MIN_CLIENT_PING_INTERVAL_S,
    TlsSettings,
)
from service.rpc.servicer import (
    CallsInFlight,
    HandoffServicer,
    internal_error,
    message_for,
    reply_item,
    status_for,
)

log = logging.getLogger(__name__)

# Streams one connection may have open: a client that multiplexes every stream of its bot
# over one connection gets as many as one process is sized for, twice over.
MAX_STREAMS_PER_CONNECTION = MAX_PENDING_CALLS
# Pings a client may send sooner than MIN_CLIENT_PING_INTERVAL_S after its previous one,
# with no data sent to it between, before its connection is closed (gRPC's default).
MAX_PING_STRIKES = 2


@dataclass(frozen=True)
class _Limits:
    max_connection_age_s: float
    max_connection_age_grace_s: float


class _Events(EventsProcessor):
    """grpclib's HTTP/2 event handling, counting the pings a client sends too often."""

    def __init__(self, handler: Any, connection: Connection, owner: _Connection) -> None:
        super().__init__(handler, connection)
        self._owner = owner
        self._last_ping: float | None = None
        self._last_ping_data_sent: float | None = None
        self._strikes = 0

    def process_ping_received(self, event: PingReceived) -> None:
        now = time.monotonic()
        data_sent = self.connection.last_data_sent
        if data_sent != self._last_ping_data_sent:
            self._strikes = 0  # the server has sent something since: a keepalive, not a flood
        elif self._last_ping is not None and now - self._last_ping < MIN_CLIENT_PING_INTERVAL_S:
            self._strikes += 1
        self._last_ping, self._last_ping_data_sent = now, data_sent
        if self._strikes > MAX_PING_STRIKES:
            log.warning(
                "gRPC client pinging more often than every %g s: connection closed",
                MIN_CLIENT_PING_INTERVAL_S,
            )
            self._owner.goaway(ErrorCodes.ENHANCE_YOUR_CALM, b"too_many_pings")
            # Not from inside grpclib's processing of this very frame, which goes on after.
            asyncio.get_running_loop().call_soon(self._owner.close, "too many pings")


class _Connection(H2Protocol):
    """One client connection: grpclib's, with the limits above."""

    def __init__(self, base: H2Protocol, limits: _Limits, connections: set[_Connection]) -> None:
        super().__init__(base.handler, base.config, base.h2_config)
        self._limits = limits
        self._connections = connections
        self._transport: asyncio.Transport | None = None
        self._h2: H2Connection | None = None
        self._goaway_sent = False
        self._timers: list[asyncio.TimerHandle] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # As grpclib's H2Protocol.connection_made (asyncio sets TCP_NODELAY itself), but with
        # the stream bound in the first SETTINGS: h2 applies a later one only once the
        # client acknowledges it, and closes the connection on a stream over the old bound.
        assert isinstance(transport, asyncio.Transport)
        h2_conn = H2Connection(config=self.h2_config)
        h2_conn.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS_PER_CONNECTION,
                SettingCodes.MAX_HEADER_LIST_SIZE: h2_conn.DEFAULT_MAX_HEADER_LIST_SIZE,
            },
        )
        h2_conn.initiate_connection()
        initial = h2_conn.local_settings.initial_window_size
        connection_window = self.config.http2_connection_window_size
        stream_window = self.config.http2_stream_window_size
        if connection_window != initial:
            h2_conn.increment_flow_control_window(connection_window - initial)
        if stream_window != initial:
            h2_conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: stream_window})
        self._h2 = h2_conn
        self._transport = transport
        self.connection = Connection(h2_conn, transport, config=self.config)
        self.connection.flush()
        self.connection.initialize()
        self.processor = _Events(self.handler, self.connection, self)
        self._connections.add(self)
        age = self._limits.max_connection_age_s
        if age > 0:
            loop = asyncio.get_running_loop()
            # gRPC's jitter: replicas do not all see their clients come back at once.
            self._timers.append(loop.call_later(age * random.uniform(0.9, 1.1), self._aged))

    def connection_lost(self, exc: BaseException | None) -> None:
        self._connections.discard(self)
        for timer in self._timers:
            timer.cancel()
        super().connection_lost(exc)

    def _aged(self) -> None:
        self.goaway()
        loop = asyncio.get_running_loop()
        self._timers.append(
            loop.call_later(
                self._limits.max_connection_age_grace_s, self.close, "maximum connection age"
            )
        )

    def goaway(self, error_code: ErrorCodes = ErrorCodes.NO_ERROR, debug: bytes = b"") -> None:
        """Tells the client to open no more streams here; the open ones go on.

        A connection with no stream open is closed at once."""
        if self._goaway_sent or self._transport is None or self._transport.is_closing():
            return
        self._goaway_sent = True
        assert self._h2 is not None
        frame = GoAwayFrame(
            0,
            last_stream_id=self._h2.highest_inbound_stream_id,
            error_code=error_code,
            additional_data=debug,
        )
        self.connection.flush()  # whatever h2 has queued goes first
        self._transport.write(frame.serialize())
        if not self.processor.streams:
            asyncio.get_running_loop().call_soon(self.close, "no stream open after GOAWAY")

    def close(self, reason: str) -> None:
        """Ends the connection: its handlers are cancelled and its streams cut."""
        if self._transport is not None and not self._transport.is_closing():
            log.debug("gRPC connection closed: %s", reason)
            self.processor.close(reason)


class _Server(Server):
    """grpclib's Server, making its connections ``_Connection``s and keeping track of them."""

    def __init__(self, handlers: list[Mapping], limits: _Limits) -> None:
        super().__init__(
            handlers,
            config=Configuration(
                _keepalive_time=KEEPALIVE_TIME_S,
                _keepalive_timeout=KEEPALIVE_TIMEOUT_S,
                _keepalive_permit_without_calls=True,
                _http2_max_pings_without_data=0,
                _http2_min_sent_ping_interval_without_data=KEEPALIVE_TIME_S,
            ),
        )
        self._limits = limits
        self.connections: set[_Connection] = set()

    def _protocol_factory(self) -> H2Protocol:
        return _Connection(super()._protocol_factory(), self._limits, self.connections)

    def port(self) -> int:
        assert isinstance(self._server, asyncio.Server), "not started"
        return int(self._server.sockets[0].getsockname()[1])

    def stop_listening(self) -> None:
        if self._server is not None:  # grpclib's asyncio server
            self._server.close()


def _ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])  # gRPC clients insist on it
    # ssl loads a certificate and key from files only: a private folder, gone at once.
    with tempfile.TemporaryDirectory() as folder:
        cert, key = Path(folder, "cert.pem"), Path(folder, "key.pem")
        cert.write_bytes(tls.cert_chain)
        key.touch(mode=0o600)
        key.write_bytes(tls.private_key)
        context.load_cert_chain(cert, key)
    if tls.client_ca is not None:
        context.load_verify_locations(cadata=tls.client_ca.decode())
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@dataclass
class GrpclibServer:
    server: _Server
    port: int
    health: HealthReporter
    calls: CallsInFlight
    stopping: asyncio.Event

    async def stop(self, grace_s: float) -> None:
        """As ``GrpcServer.stop``: new calls are refused at once (no new connection, GOAWAY
        on each open one), unary calls in flight get ``grace_s`` to finish, then whatever is
        still open ends UNAVAILABLE."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        self.stopping.set()
        self.server.stop_listening()
        for connection in list(self.server.connections):
            connection.goaway()
        await self.calls.wait_idle(grace_s)
        self.server.close()  # cancels every handler still running: each ends UNAVAILABLE
        await self.server.wait_closed()
        for connection in list(self.server.connections):
            connection.close("the server is stopping")
        if not await self.calls.wait_idle(max(deadline - loop.time(), 0.0)):
            log.warning("%d call(s) still running after %g s", self.calls.count, grace_s)


STREAM_AGENT_REPLIES = f"/{HANDOFF_SERVICE}/StreamAgentReplies"


def _stream_agent_replies(
    manager: HandoffManager, tokens: TokenSet | None, ends_on_stop: EndsOnStop
) -> Handler:
    """The servicer's StreamAgentReplies, its steps driven from grpclib's handler rather than
    through its generator: an idle stream then holds one frame fewer (``make
    bench-transports``)."""

    async def handle(stream: Stream[Any, Any]) -> None:
        with ends_on_stop:
            request = await read_request(
                stream,
                STREAM_AGENT_REPLIES,
                pb.StreamAgentRepliesRequest,
                tokens,
                MAX_REQUEST_BYTES,
            )
            assert isinstance(request, pb.StreamAgentRepliesRequest)
            try:
                items = await manager.events(request.handoff_id, request.after_cursor)
            except errors.HandoffError as exc:
                raise status_error(status_for(exc), message_for(exc)) from None
            del request  # not held for the stream's life
            # As the servicer: the request is valid, say so now (see HandoffServicer).
            await stream.send_initial_metadata()
            while True:
                try:
                    item = await anext(items)
                except StopAsyncIteration:
                    return
                except errors.HandoffError as exc:
                    raise status_error(status_for(exc), message_for(exc)) from None
                except Exception as exc:  # the caller gets a status, never a stack trace
                    raise status_error(grpc.StatusCode.INTERNAL, internal_error(exc)) from None
                await stream.send_message(reply_item(item))
                del item  # an idle stream holds nothing it sent

    return Handler(
        handle,
        Cardinality.UNARY_STREAM,
        pb.StreamAgentRepliesRequest,
        pb.StreamAgentRepliesResponse,
    )


async def create_grpclib_server(
    manager: HandoffManager,
    host: str,
    port: int,
    *,
    max_connection_age_s: float = 0,
    max_connection_age_grace_s: float = 0,
    auth: TokenSet | None = None,
    tls: TlsSettings | None = None,
) -> GrpclibServer:
    """As ``create_server``, on grpclib: HandoffService, grpc.health.v1 and reflection."""
    tokens = auth if auth else None
    stopping = asyncio.Event()
    ends_on_stop = EndsOnStop(stopping)
    servicer = HandoffServicer(manager)
    health = HealthReporter((HANDOFF_SERVICE,))
    reflecting = reflection.aio.ReflectionServicer(
        (HANDOFF_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME)
    )
    own = {STREAM_AGENT_REPLIES: _stream_agent_replies(manager, tokens, ends_on_stop)}
    handlers: dict[str, Handler] = {}
    for served, descriptor in (
        (servicer, pb.DESCRIPTOR.services_by_name["HandoffService"]),
        (health.servicer, health_pb2.DESCRIPTOR.services_by_name["Health"]),
        (reflecting, reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"]),
    ):
        handlers |= servicer_handlers(
            served,
            descriptor,
            tokens=tokens,
            max_request_bytes=MAX_REQUEST_BYTES,
            ends_on_stop=ends_on_stop,
            own=own,
        )
    server = _Server([Mapping(handlers)], _Limits(max_connection_age_s, max_connection_age_grace_s))
    await server.start(
        host,
        port,
        ssl=None if tls is None else _ssl_context(tls),
        reuse_address=True,
        reuse_port=False,
    )
    bound = server.port()
    return GrpclibServer(server, bound, health, servicer.calls, stopping)
