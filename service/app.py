"""The composition root: builds the store, the Brevo client, the core, and both servers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from gateway.app import create_gateway
from service.brevo.client import AgentIdentity, BrevoClient, RetryPolicy
from service.brevo.sandbox import BrevoSandbox
from service.config import Config
from service.core import errors
from service.core.access import SourceAllowList, TokenSet, parse_networks
from service.core.handoffs import HandoffManager, HandoffSettings
from service.core.inbound import ServiceIdentity
from service.core.ports import HandoffStore, Locks
from service.http_server import RunningHttpServer, start_http_server
from service.metrics import Metrics
from service.rpc.grpclib_server import GrpclibServer, create_grpclib_server
from service.rpc.health import HealthReporter
from service.rpc.server import GrpcServer, TlsSettings, create_server
from service.storage.redis_store import RedisSettings, RedisStore, describe_url
from service.storage.sqlite import SqliteStore

log = logging.getLogger(__name__)

HEALTH_CHECK_INTERVAL_S = 1.0
BREVO_KEY_RECHECK_S = 5.0


class StartupError(Exception):
    """The service cannot start; the message is one line saying what to fix."""


@dataclass
class RunningService:
    config: Config
    manager: HandoffManager
    store: HandoffStore
    brevo: BrevoClient
    grpc: GrpcServer | GrpclibServer
    http: RunningHttpServer
    metrics: Metrics
    sandbox: BrevoSandbox | None = None
    sandbox_http: RunningHttpServer | None = None
    background: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def grpc_port(self) -> int:
        return self.grpc.port

    @property
    def health(self) -> HealthReporter:
        return self.grpc.health

    @property
    def http_port(self) -> int:
        return self.http.port

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def webhook_url(self) -> str:
        return (
            f"http://127.0.0.1:{self.http.port}/webhooks/brevo/{self.config.webhook_token.reveal()}"
        )

    async def stop(self, grace_s: float = 5.0) -> None:
        """Drains and stops within about ``grace_s``.

        At once: readiness and gRPC health turn to not-serving, open streams end with
        UNAVAILABLE (their clients resume elsewhere with their cursor) and new streams are
        refused. Then both servers stop taking new requests and give the ones in flight
        (a SendMessage waiting on Brevo, a webhook being stored) up to ``grace_s`` to finish.
        """
        self.manager.begin_shutdown()
        await self.health.shut_down()
        await asyncio.gather(self.http.stop(grace_s), self.grpc.stop(grace_s))
        for task in self.background:
            task.cancel()
        for task in self.background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.manager.stop_releases()
        await self.store.close()
        await self.brevo.aclose()
        if self.sandbox is not None:
            await self.sandbox.aclose()
        if self.sandbox_http is not None:
            await self.sandbox_http.stop(grace_s)


def _read(setting: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise StartupError(f"cannot read {setting}={path}: {exc.strerror or exc}") from None


def load_tls(config: Config) -> TlsSettings | None:
    """The gRPC TLS files the configuration names, read; None for plaintext."""
    if not config.grpc_tls_cert:
        return None
    return TlsSettings(
        cert_chain=_read("GRPC_TLS_CERT", config.grpc_tls_cert),
        private_key=_read("GRPC_TLS_KEY", config.grpc_tls_key),
        client_ca=_read("GRPC_TLS_CLIENT_CA", config.grpc_tls_client_ca)
        if config.grpc_tls_client_ca
        else None,
    )


async def open_store(config: Config) -> tuple[HandoffStore, Locks | None]:
    """Redis when REDIS_URL is set (with leases shared by the replicas), else SQLite."""
    if config.redis_url:
        redis_store = await RedisStore.open(
            RedisSettings(
                url=config.redis_url.reveal(),
                prefix=config.redis_key_prefix,
                retention_s=config.redis_retention_s,
                stream_maxlen=config.redis_stream_maxlen,
                all_stream_maxlen=config.redis_all_stream_maxlen,
            )
        )
        log.info("state in Redis at %s", describe_url(config.redis_url.reveal()))
        return redis_store, redis_store.locks()
    try:
        sqlite_store = await SqliteStore.open(config.sqlite_path, config.sqlite_synchronous)
    except errors.StoreUnavailable as exc:
        raise StartupError(f"cannot open HANDOFF_SQLITE_PATH={config.sqlite_path}: {exc}") from None
    log.info("state in SQLite at %s", config.sqlite_path)
    return sqlite_store, None


async def start_service(config: Config, *, retry: RetryPolicy | None = None) -> RunningService:
    """Starts everything ``config`` describes and returns once both servers accept traffic."""
    sandbox: BrevoSandbox | None = None
    sandbox_http: RunningHttpServer | None = None
    api_key = config.brevo_api_key.reveal()
    base_url = config.brevo_base_url
    if config.use_sandbox:
        api_key = f"sandbox-{secrets.token_hex(8)}"
        sandbox = BrevoSandbox(
            api_key=api_key,
            auto_agent=config.sandbox_agent,
            agent_reply_delay_s=config.sandbox_agent_delay_s,
            user_prefix=config.user_prefix,
        )
        try:
            sandbox_http = await start_http_server(sandbox.app, "127.0.0.1", config.sandbox_port)
        except OSError as exc:
            await sandbox.aclose()
            raise StartupError(
                f"cannot listen for the built-in Brevo sandbox on port {config.sandbox_port}: "
                f"{exc}; set SANDBOX_PORT to a free port (0 picks one), or BREVO_API_KEY to "
                "use Brevo itself"
            ) from None
        base_url = f"{sandbox_http.base_url}/v3"

    metrics = Metrics()
    brevo = BrevoClient(
        base_url,
        api_key,
        AgentIdentity(
            agent_id=config.brevo_agent_id,
            agent_email=config.brevo_agent_email,
            agent_name=config.brevo_agent_name,
            received_from=config.brevo_received_from,
        ),
        timeout_s=config.brevo_timeout_s,
        retry=retry or RetryPolicy(max_attempts=config.brevo_max_attempts),
        observe=metrics.brevo_call,
    )
    store: HandoffStore | None = None
    try:
        store, locks = await open_store(config)
        manager = HandoffManager(
            store,
            brevo,
            HandoffSettings(
                identity=ServiceIdentity(config.brevo_agent_id, config.brevo_received_from),
                user_prefix=config.user_prefix,
                closing_notice=config.closing_notice,
                timeout_notice=config.timeout_notice,
                agent_timeout_s=config.agent_timeout_s,
                opening_max_chars=config.opening_max_chars,
                heartbeat_s=config.heartbeat_s,
                reorder_window_s=config.reorder_window_s,
                stream_buffer=config.stream_buffer,
                log_message_text=config.log_message_text,
            ),
            locks=locks,
            on_delivered=metrics.event_delivered,
        )
        metrics.watch(manager)
        try:
            log.info("Brevo API key accepted: %s", await manager.check_brevo_key())
        except errors.BrevoAuthRejected as exc:
            raise StartupError(str(exc)) from None
        except errors.BrevoUnavailable as exc:
            log.warning(
                "Brevo could not be reached at start-up; not ready until it confirms the API "
                "key (checking every %.0f s): %s",
                BREVO_KEY_RECHECK_S,
                exc,
            )
        try:
            serve = create_grpclib_server if config.grpc_server == "grpclib" else create_server
            grpc_server = await serve(
                manager,
                config.host,
                config.grpc_port,
                max_connection_age_s=config.grpc_max_connection_age_s,
                max_connection_age_grace_s=config.grpc_max_connection_age_grace_s,
                auth=TokenSet(t.reveal() for t in config.grpc_auth_tokens),
                tls=load_tls(config),
            )
        except (OSError, RuntimeError) as exc:
            raise StartupError(
                f"cannot listen for gRPC on port {config.grpc_port}: {exc}"
            ) from None
        try:
            http = await start_http_server(
                create_gateway(
                    manager,
                    TokenSet(t.reveal() for t in config.webhook_tokens),
                    config.webhook_max_bytes,
                    metrics,
                    SourceAllowList(
                        parse_networks(config.webhook_allowed_cidrs),
                        config.webhook_trusted_proxy_header,
                    ),
                ),
                config.host,
                config.http_port,
            )
        except OSError as exc:
            await grpc_server.stop(0)
            raise StartupError(
                f"cannot listen for webhooks on port {config.http_port}: {exc}"
            ) from None
    except BaseException:
        if store is not None:
            await store.close()
        await brevo.aclose()
        if sandbox is not None:
            await sandbox.aclose()
        if sandbox_http is not None:
            await sandbox_http.stop(1)
        raise
    running = RunningService(
        config=config,
        manager=manager,
        store=store,
        brevo=brevo,
        grpc=grpc_server,
        http=http,
        metrics=metrics,
        sandbox=sandbox,
        sandbox_http=sandbox_http,
    )
    if sandbox is not None:
        sandbox.set_webhook_url(running.webhook_url)
    running.background.append(
        asyncio.create_task(grpc_server.health.follow(manager.check_ready, HEALTH_CHECK_INTERVAL_S))
    )
    if not manager.brevo_key_checked:
        running.background.append(asyncio.create_task(_recheck_brevo_key(manager)))
    if config.reorder_window_s > 0:
        # Releases what a stopped or crashed process held, and what its timers missed.
        running.background.append(asyncio.create_task(manager.run_releases()))
    if config.agent_timeout_s > 0:
        interval = min(max(config.agent_timeout_s / 10, 0.05), 5.0)
        running.background.append(asyncio.create_task(manager.run_timeouts(interval)))
    return running


async def _recheck_brevo_key(manager: HandoffManager) -> None:
    """Asks Brevo again until it confirms the API key; readiness waits for that."""
    while not manager.brevo_key_checked:
        await asyncio.sleep(BREVO_KEY_RECHECK_S)
        try:
            log.info("Brevo API key accepted: %s", await manager.check_brevo_key())
        except errors.BrevoAuthRejected as exc:
            log.error("Brevo refused the API key; this replica stays not ready: %s", exc)
        except errors.BrevoUnavailable as exc:
            log.warning("Brevo still cannot confirm the API key: %s", exc)
