"""Nobody gets in: bearer tokens on gRPC (with rotation), TLS and mutual TLS, webhook tokens
(with rotation) and the webhook source allow-list. Every refusal stores nothing."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support import Harness, agent_fragment, close_harness, make_config, open_harness

from service.rpc.generated.handoff.v1 import handoff_pb2 as pb
from service.rpc.generated.handoff.v1 import handoff_pb2_grpc as pb_grpc

NEW_GRPC_TOKEN = "grpc-token-NEW-0123456789abcdef"
OLD_GRPC_TOKEN = "grpc-token-OLD-0123456789abcdef"
RETIRED_GRPC_TOKEN = "grpc-token-RETIRED-0123456789ab"
NEW_WEBHOOK_TOKEN = "hook-token-NEW-0123456789abcdef"
OLD_WEBHOOK_TOKEN = "hook-token-OLD-0123456789abcdef"
BREVO_RANGES = "1.179.112.0/20,172.246.240.0/20"

MISSING = (
    "this service requires authentication: send the metadata "
    "'authorization: Bearer <token>' with one of its GRPC_AUTH_TOKENS"
)
REFUSED = "the bearer token is not accepted: use a current one of the service's GRPC_AUTH_TOKENS"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def open_with(tmp_path: Path, *flags: str) -> Harness:
    return await open_harness(make_config(tmp_path, *flags))


@pytest.fixture
async def guarded(tmp_path: Path) -> AsyncIterator[Harness]:
    h = await open_with(
        tmp_path,
        "--grpc-auth-tokens",
        f"{NEW_GRPC_TOKEN},{OLD_GRPC_TOKEN}",
        "--webhook-token",
        f"{NEW_WEBHOOK_TOKEN},{OLD_WEBHOOK_TOKEN}",
    )
    try:
        yield h
    finally:
        await close_harness(h)


async def every_rpc(
    stub: pb_grpc.HandoffServiceAsyncStub, metadata: Any
) -> list[tuple[grpc.StatusCode, str | None]]:
    """Calls each RPC once with ``metadata``; returns each one's status code and message."""
    codes: list[tuple[grpc.StatusCode, str | None]] = []
    calls: list[Any] = [
        lambda: stub.StartHandoff(
            pb.StartHandoffRequest(conversation_id="conv-intruder"), metadata=metadata
        ),
        lambda: stub.SendMessage(
            pb.SendMessageRequest(handoff_id="ho_x", client_message_id="1", text="hi"),
            metadata=metadata,
        ),
        lambda: stub.StopHandoff(pb.StopHandoffRequest(handoff_id="ho_x"), metadata=metadata),
        lambda: stub.GetHandoff(pb.GetHandoffRequest(handoff_id="ho_x"), metadata=metadata),
    ]
    for call in calls:
        try:
            await call()
        except grpc.aio.AioRpcError as exc:
            codes.append((exc.code(), exc.details()))
        else:
            codes.append((grpc.StatusCode.OK, None))
    stream = stub.StreamAgentReplies(
        pb.StreamAgentRepliesRequest(handoff_id="ho_x"), metadata=metadata
    )
    try:
        await stream.read()
    except grpc.aio.AioRpcError as exc:
        codes.append((exc.code(), exc.details()))
    else:
        codes.append((grpc.StatusCode.OK, None))
    return codes


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ((), MISSING),
        ((("authorization", f"Basic {NEW_GRPC_TOKEN}"),), MISSING),
        ((("authorization", "Bearer "),), MISSING),
        (bearer("not-a-token-of-this-service"), REFUSED),
        (bearer(RETIRED_GRPC_TOKEN), REFUSED),
        (bearer(NEW_GRPC_TOKEN + "x"), REFUSED),
        (bearer(NEW_GRPC_TOKEN[:-1]), REFUSED),
    ],
    ids=["none", "basic", "empty", "wrong", "retired", "longer", "shorter"],
)
async def test_every_rpc_refuses_a_caller_without_a_valid_token_and_stores_nothing(
    guarded: Harness, metadata: Any, message: str
) -> None:
    codes = await every_rpc(guarded.stub, metadata)
    assert codes == [(grpc.StatusCode.UNAUTHENTICATED, message)] * 5
    # Nothing was stored or posted: the conversation is new to a caller with a token.
    started = await guarded.stub.StartHandoff(
        pb.StartHandoffRequest(conversation_id="conv-intruder"), metadata=bearer(OLD_GRPC_TOKEN)
    )
    assert started.created
    assert [c for c in guarded.sandbox.rest_calls if c[0] == "POST"] == [
        ("POST", "/v3/conversations/messages", 200)
    ]


async def test_both_tokens_of_a_rotation_work_and_health_needs_none(guarded: Harness) -> None:
    for token in (NEW_GRPC_TOKEN, OLD_GRPC_TOKEN):
        started = await guarded.stub.StartHandoff(
            pb.StartHandoffRequest(conversation_id=f"conv-{token[11:14]}"), metadata=bearer(token)
        )
        got = await guarded.stub.GetHandoff(
            pb.GetHandoffRequest(handoff_id=started.handoff.id),
            metadata=(("authorization", f"bearer  {token} "),),  # scheme case, spaces
        )
        assert got.handoff.id == started.handoff.id
    health: Any = health_pb2_grpc.HealthStub(guarded.channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    channel: Any = guarded.channel  # the typeshed stubs only know sync channels
    reflection: Any = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        async for _ in reflection.ServerReflectionInfo(iter([request])):
            pass
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    listed = [
        answer
        async for answer in reflection.ServerReflectionInfo(
            iter([request]), metadata=bearer(NEW_GRPC_TOKEN)
        )
    ]
    assert "handoff.v1.HandoffService" in {s.name for s in listed[0].list_services_response.service}


async def test_a_rotated_out_token_is_refused_after_the_restart_that_retires_it(
    tmp_path: Path,
) -> None:
    first = await open_with(tmp_path, "--grpc-auth-tokens", f"{OLD_GRPC_TOKEN},{NEW_GRPC_TOKEN}")
    try:
        started = await first.stub.StartHandoff(
            pb.StartHandoffRequest(conversation_id="conv-rotate"), metadata=bearer(OLD_GRPC_TOKEN)
        )
    finally:
        await close_harness(first)
    second = await open_with(tmp_path, "--grpc-auth-tokens", NEW_GRPC_TOKEN)
    try:
        request = pb.GetHandoffRequest(handoff_id=started.handoff.id)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await second.stub.GetHandoff(request, metadata=bearer(OLD_GRPC_TOKEN))
        assert (refused.value.code(), refused.value.details()) == (
            grpc.StatusCode.UNAUTHENTICATED,
            REFUSED,
        )
        got = await second.stub.GetHandoff(request, metadata=bearer(NEW_GRPC_TOKEN))
        assert got.handoff.id == started.handoff.id
    finally:
        await close_harness(second)


async def test_webhooks_need_a_current_token_and_refusals_store_nothing(guarded: Harness) -> None:
    started = await guarded.stub.StartHandoff(
        pb.StartHandoffRequest(conversation_id="conv-hook"), metadata=bearer(NEW_GRPC_TOKEN)
    )
    visitor = started.handoff.visitor_id
    for wrong in ("x" * 32, NEW_WEBHOOK_TOKEN[:-1], NEW_WEBHOOK_TOKEN + "0", "hook-token-RETIRED"):
        body = agent_fragment(visitor, f"refused-{wrong[-4:]}", "should not arrive")
        refused = await guarded.post(body, token=wrong)
        assert (refused.status_code, refused.json()) == (404, {"error": "not found"})
    for n, token in enumerate((OLD_WEBHOOK_TOKEN, NEW_WEBHOOK_TOKEN)):
        accepted = await guarded.post(
            agent_fragment(visitor, f"ok-{n}", f"hello {n}", n), token=token
        )
        assert accepted.status_code == 200
    stream = guarded.stub.StreamAgentReplies(
        pb.StreamAgentRepliesRequest(handoff_id=started.handoff.id), metadata=bearer(NEW_GRPC_TOKEN)
    )
    first: list[Any] = [await stream.read() for _ in range(3)]
    stream.cancel()
    # The agent joined with the first accepted message; the refused ones left no trace.
    assert [item.event.WhichOneof("payload") for item in first] == [
        "agent_joined",
        "agent_message",
        "agent_message",
    ]
    texts = [item.event.agent_message.text for item in first[1:]]
    assert texts == ["hello 0", "hello 1"]


async def test_webhooks_from_outside_the_allowed_ranges_are_refused(tmp_path: Path) -> None:
    h = await open_with(tmp_path, "--webhook-allowed-cidrs", BREVO_RANGES)
    try:
        handoff = await h.start_handoff("conv-cidr")
        body = agent_fragment(handoff.visitor_id, "m-cidr", "from loopback")
        # The right token, but from 127.0.0.1, and a forged header is not looked at.
        refused = await h.http.post(
            h.webhook_url, json=body, headers={"X-Forwarded-For": "1.179.112.7"}
        )
        assert (refused.status_code, refused.json()) == (404, {"error": "not found"})
        got = await h.stub.GetHandoff(pb.GetHandoffRequest(handoff_id=handoff.id))
        assert got.handoff.state == pb.HANDOFF_STATE_PENDING_AGENT  # the agent never joined
    finally:
        await close_harness(h)


async def test_the_trusted_proxy_header_is_judged_only_when_configured(tmp_path: Path) -> None:
    h = await open_with(
        tmp_path,
        "--webhook-allowed-cidrs",
        BREVO_RANGES,
        "--webhook-trusted-proxy-header",
        "X-Forwarded-For",
    )
    try:
        handoff = await h.start_handoff("conv-proxy")
        visitor = handoff.visitor_id
        cases = [
            ({"X-Forwarded-For": "203.0.113.9"}, 404),  # outside
            ({"X-Forwarded-For": "1.179.112.7, 203.0.113.9"}, 404),  # the proxy saw 203…
            ({}, 404),  # no header: no address to judge
            ({"X-Forwarded-For": "not-an-address"}, 404),
            ({"X-Forwarded-For": "203.0.113.9, 172.246.240.15"}, 200),  # Brevo, via the proxy
        ]
        for n, (headers, status) in enumerate(cases):
            body = agent_fragment(visitor, f"p-{n}", f"text {n}", n)
            answer = await h.http.post(h.webhook_url, json=body, headers=headers)
            assert answer.status_code == status, (headers, answer.text)
        events = await h.collect(handoff.id, 2)
        assert [e.agent_message.text for e in events if e.HasField("agent_message")] == ["text 4"]
    finally:
        await close_harness(h)


# --- TLS and mutual TLS -------------------------------------------------------------------


OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(  # noqa: S603 - fixed commands of this test
        [OPENSSL, *args], cwd=cwd, check=True, capture_output=True
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    d = tmp_path_factory.mktemp("pki")
    new_key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    openssl("req", "-x509", *new_key, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=test-ca", cwd=d)  # fmt: skip
    for name, extension in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        openssl("req", *new_key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        (d / f"{name}.ext").write_text(extension + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
                "-extfile", f"{name}.ext", cwd=d)  # fmt: skip
    return d


async def get_unknown(channel: grpc.aio.Channel) -> grpc.StatusCode:
    """A GetHandoff for a handoff that does not exist: NOT_FOUND proves the call got through."""
    try:
        await pb_grpc.HandoffServiceStub(channel).GetHandoff(
            pb.GetHandoffRequest(handoff_id="ho_none"), timeout=5
        )
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_tls_serves_verified_clients_and_refuses_plaintext(tmp_path: Path, pki: Path) -> None:
    h = await open_with(
        tmp_path,
        "--grpc-tls-cert",
        str(pki / "server.pem"),
        "--grpc-tls-key",
        str(pki / "server.key"),
    )
    try:
        target = f"127.0.0.1:{h.running.grpc_port}"
        trusted = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes())
        async with grpc.aio.secure_channel(target, trusted) as channel:
            assert await get_unknown(channel) == grpc.StatusCode.NOT_FOUND
        async with grpc.aio.insecure_channel(target) as plain:
            assert await get_unknown(plain) == grpc.StatusCode.UNAVAILABLE
    finally:
        await close_harness(h)


async def test_mutual_tls_refuses_a_client_without_a_certificate(tmp_path: Path, pki: Path) -> None:
    h = await open_with(
        tmp_path,
        "--grpc-tls-cert",
        str(pki / "server.pem"),
        "--grpc-tls-key",
        str(pki / "server.key"),
        "--grpc-tls-client-ca",
        str(pki / "ca.pem"),
    )
    try:
        target = f"127.0.0.1:{h.running.grpc_port}"
        ca = (pki / "ca.pem").read_bytes()
        with_cert = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=(pki / "client.key").read_bytes(),
            certificate_chain=(pki / "client.pem").read_bytes(),
        )
        async with grpc.aio.secure_channel(target, with_cert) as channel:
            assert await get_unknown(channel) == grpc.StatusCode.NOT_FOUND
        without = grpc.ssl_channel_credentials(root_certificates=ca)
        async with grpc.aio.secure_channel(target, without) as channel:
            assert await get_unknown(channel) == grpc.StatusCode.UNAVAILABLE
    finally:
        await close_harness(h)
