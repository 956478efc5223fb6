"""``python -m service``: run the handoff service until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys

from service.app import StartupError, start_service
from service.config import Config, ConfigError, load_config
from service.logs import configure_logging

log = logging.getLogger("service")

# Python's cycle collector, tuned for a long-running server (CPython's defaults are
# 700, 10, 10): a collection every 50,000 allocations rather than 700 lets most of a
# webhook's or an event's objects die before one runs, so far fewer reach the oldest
# generation, whose full collections held the event loop for tens of milliseconds every few
# seconds with 1,000 streams open under make bench's webhook load (seen with gc.callbacks).
# With these settings the same run had none after start-up.
GC_THRESHOLDS = (50_000, 20, 100)


def tune_garbage_collector() -> None:
    """Once started: what start-up made stays (frozen: never scanned again), and the
    collector runs less often (GC_THRESHOLDS). Cyclic garbage still goes, a little later."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    log.info(
        "garbage collector: %d start-up objects frozen, a collection every %d allocations",
        gc.get_freeze_count(),
        gc.get_threshold()[0],
    )


async def serve(config: Config) -> None:
    running = await start_service(config)
    tune_garbage_collector()
    if running.sandbox_http is not None:
        log.warning(
            "BREVO_API_KEY is not set: this service talks to the built-in Brevo SANDBOX at %s, "
            "not to Brevo. Its simulated agent 'Sam' answers every handoff.",
            running.sandbox_http.base_url,
        )
    if not config.grpc_auth_tokens:
        log.warning(
            "GRPC_AUTH_TOKENS is not set: any client that reaches the gRPC port can call the "
            "service. Set it to require 'authorization: Bearer <token>'."
        )
    log.info(
        "serving gRPC (%s)%s on %s:%d and Brevo webhooks on http://%s:%d/webhooks/brevo/<token>",
        "grpclib" if config.grpc_server == "grpclib" else "grpc.aio",
        (" over mutual TLS" if config.grpc_tls_client_ca else " over TLS")
        if config.grpc_tls_cert
        else "",
        config.host,
        running.grpc_port,
        config.host,
        running.http_port,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info(
        "shutting down: draining streams, grace %g s for calls in flight", config.shutdown_grace_s
    )
    await running.stop(config.shutdown_grace_s)


def main(argv: list[str]) -> int:
    try:
        config = load_config(argv)
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.secrets, config.log_format)
    try:
        asyncio.run(serve(config))
    except StartupError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
