"""grpc.health.v1 follows readiness; server reflection describes the service."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support import Harness, until

from service.rpc.server import HANDOFF_SERVICE

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def status(harness: Harness, service: str = "") -> int:
    # The typeshed stubs of these packages only describe blocking stubs: Any for aio.
    stub: Any = health_pb2_grpc.HealthStub(harness.channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service))
    return int(response.status)


async def eventually_status(harness: Harness, wanted: int) -> None:
    async def reached() -> bool:
        return await status(harness) == await status(harness, HANDOFF_SERVICE) == wanted

    name = health_pb2.HealthCheckResponse.ServingStatus.Name(wanted)
    await until(reached, timeout_s=5, what=f"health {name}")


async def test_health_is_serving_for_the_server_and_the_service(harness: Harness) -> None:
    assert await status(harness) == SERVING
    assert await status(harness, "handoff.v1.HandoffService") == SERVING
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await status(harness, "no.such.Service")
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_health_follows_the_store_and_stays_down_once_shutting_down(
    harness: Harness,
) -> None:
    await harness.running.store.close()  # stop() closes it again, harmlessly
    await eventually_status(harness, NOT_SERVING)
    await harness.running.health.set_serving(True)
    await harness.running.health.shut_down()
    await harness.running.health.set_serving(True)  # ignored from now on
    await eventually_status(harness, NOT_SERVING)


async def test_reflection_lists_and_describes_the_services(harness: Harness) -> None:
    stub: Any = reflection_pb2_grpc.ServerReflectionStub(harness.channel)  # type: ignore[arg-type]
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=HANDOFF_SERVICE),
    ]
    answers = [answer async for answer in stub.ServerReflectionInfo(iter(requests))]
    names = sorted(s.name for s in answers[0].list_services_response.service)
    assert names == [
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "handoff.v1.HandoffService",
    ]
    files = answers[1].file_descriptor_response.file_descriptor_proto
    assert files  # the proto of handoff.v1, which grpcurl needs to build requests
    assert any(b"StreamAgentReplies" in f for f in files)
