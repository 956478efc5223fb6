"""gRPC health checking (grpc.health.v1) that follows the service's readiness.

``grpc-health-probe`` and Kubernetes' gRPC probes ask the same question as ``GET /readyz``:
can this replica serve now (is its store reachable)? The answer is re-checked every
``interval_s``; after ``shut_down`` it stays NOT_SERVING.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from service.core.errors import HandoffError

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthReporter:
    def __init__(self, service_names: tuple[str, ...]) -> None:
        self.servicer = health_aio.HealthServicer()
        # "" is the whole server, as grpc-health-probe asks by default.
        self._names = ("", *service_names)
        self._serving: bool | None = None

    async def set_serving(self, serving: bool) -> None:
        if serving == self._serving:
            return
        self._serving = serving
        for name in self._names:
            await self.servicer.set(name, SERVING if serving else NOT_SERVING)

    async def follow(self, check: Callable[[], Awaitable[None]], interval_s: float) -> None:
        """Runs ``check`` every ``interval_s`` until cancelled: SERVING when it passes."""
        while True:
            try:
                await check()
            except HandoffError as exc:
                if self._serving is not False:
                    log.warning("gRPC health: NOT_SERVING (%s)", exc)
                await self.set_serving(False)
            else:
                if self._serving is False:
                    log.info("gRPC health: SERVING again")
                await self.set_serving(True)
            await asyncio.sleep(interval_s)

    async def shut_down(self) -> None:
        """NOT_SERVING for good: the process is stopping."""
        await self.servicer.enter_graceful_shutdown()
