"""Brevo faults: a stand-in Brevo that fails a random 30 % of its message posts.

The claim under test: 1,000 SendMessage calls across 50 handoffs, each retried by its client
with the same client_message_id until it succeeds, against a Brevo that answers a random
30 % of ``POST /v3/conversations/messages`` with 429, 500, 502, a timeout or a dropped
connection. Every message reaches Brevo, none twice within what the service can know, and
each handoff's messages keep their order.

"Within what the service can know": Brevo has no idempotency key. When Brevo stored a
message but its answer was lost (a timeout or a dropped connection after processing, or a
slow Brevo storing it only after the client gave up), the service cannot tell that attempt
from one that never arrived, and its retry posts the message again (documented in
``BrevoClient``). So the stand-in records, for each call, whether the sandbox behind it
stored the message, and the test requires of each message (openings included): exactly one
post answered with success (the service never posts again what it knows is there), and
exactly ``1 + (its answer-lost attempts)`` stored copies; none at all when the
after-processing faults are turned off. A second pass resends every client_message_id: each
answers duplicate=true with the first answer's Brevo id, and nothing is posted.

The stand-in (``FaultyBrevo``) is a small HTTP/1.1 server on a loopback socket in front of
the project's ``BrevoSandbox`` (Brevo's exact shapes; reached in-process through
``httpx.ASGITransport``). Working on the raw socket lets it hold a request past the client's
timeout or close the connection without an answer, before or after the sandbox stored it.
Its fault decisions are seeded per (message text, nth attempt of that text), so that a
schedule does not depend on the order in which concurrent calls happen to arrive.

Figures go to ``build/reliability/brevo_faults.json`` (one entry per variant) and to
pytest's ``record_property`` (``--junitxml``); they are printed too (``-s`` or ``-rP``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import random
import secrets
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import TypeVar

import grpc
import httpx
import pytest

from service.app import RunningService, start_service
from service.brevo.client import RetryPolicy
from service.brevo.sandbox import BrevoSandbox
from service.config import Config, load_config
from service.rpc.generated.handoff.v1 import handoff_pb2 as pb
from service.rpc.generated.handoff.v1 import handoff_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ROOT / "build" / "reliability" / "brevo_faults.json"

API_KEY = "xkeysib-reliability0faults-TestKey"
WEBHOOK_TOKEN = "tok_reliability_brevo_faults_0001"
# Not imported from tests/support.py, so that `mypy tests/reliability/<this file>` finds
# every import; the log audit picks up the secrets above by their names.
SERVICE_AGENT_ID = "ReliabilityBot001"
USER_PREFIX = "Botpress User: "
MESSAGES_PATH = "/v3/conversations/messages"

SEED = int(os.environ.get("BREVO_FAULTS_SEED", "20240611"))
FAULT_RATE = 0.30
HANDOFFS = 50
MESSAGES_PER_HANDOFF = 20
BREVO_TIMEOUT_S = 0.3  # the service's timeout of one Brevo call (--brevo-timeout-seconds)
HOLD_S = BREVO_TIMEOUT_S + 0.2  # a "timeout" fault holds the call this long, then hangs up
SERVICE_ATTEMPTS = 2  # attempts per Brevo call inside the service (--brevo-max-attempts)
SERVICE_RETRY = RetryPolicy(
    max_attempts=SERVICE_ATTEMPTS, base_delay_s=0.01, max_delay_s=0.05, max_rate_limit_wait_s=2.0
)
# Shorter than the service's worst case (two timeouts in a row, ~0.65 s), so that some calls
# end DEADLINE_EXCEEDED while the service still works on them: the retry must then find the
# message sent by the abandoned call rather than post it again.
RPC_DEADLINE_S = 0.5
CLIENT_MAX_ATTEMPTS = 60
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)

# What the stand-in does with one call:
OK = "ok"
STATUS_FAULTS = ("429", "500", "502")  # answered at once, nothing stored
LOST_BEFORE = ("timeout_before", "drop_before")  # nothing stored, no answer
# Stored, answer lost: the service cannot know. "timeout_late" stores the message only after
# the client gave up (a slow Brevo), so its copy may land after the retry's, even after the
# next message.
LOST_AFTER = ("timeout_after", "timeout_late", "drop_after")

T = TypeVar("T")


# --- the faulty Brevo --------------------------------------------------------------------


@dataclass(frozen=True)
class FaultPlan:
    seed: int
    rate: float = FAULT_RATE
    after_processing: bool = True  # may a timeout or a drop come after the sandbox stored it?
    force: str = ""  # this fate for every post instead

    def decide(self, text: str, attempt: int) -> str:
        """The fate of the ``attempt``-th post of ``text``: ``OK`` or a fault kind."""
        if self.force:
            return self.force
        rng = random.Random(f"{self.seed}|{text}|{attempt}")
        if rng.random() >= self.rate:
            return OK
        category = rng.choice(("429", "500", "502", "timeout", "drop"))
        if category in STATUS_FAULTS:
            return category
        if not self.after_processing:
            return f"{category}_before"
        if category == "timeout":
            return rng.choice(LOST_BEFORE[:1] + LOST_AFTER[:2])
        return rng.choice((LOST_BEFORE[1], LOST_AFTER[2]))


@dataclass
class PostRecord:
    """One POST /v3/conversations/messages as the stand-in saw it."""

    visitor_id: str
    text: str
    attempt: int  # the nth post of this text
    kind: str  # OK or a fault kind
    stored: bool = False  # whether the sandbox stored the message
    message_id: str = ""  # the id the sandbox gave it (answered or not)


@dataclass
class FaultyBrevo:
    """Brevo's REST API on a loopback port, failing message posts by ``plan``.

    Other /v3 calls (GET /v3/account at start-up) pass through unfaulted.
    """

    sandbox: BrevoSandbox
    plan: FaultPlan
    posts: list[PostRecord] = field(default_factory=list)
    other_calls: Counter[str] = field(default_factory=Counter)
    _attempts: Counter[str] = field(default_factory=Counter)
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)
    _busy: int = 0  # requests being answered (or held)
    _idle: asyncio.Event = field(default_factory=asyncio.Event)
    _asgi: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self._asgi = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.sandbox.app), base_url="http://brevo.invalid"
        )
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    @property
    def base_url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v3"

    async def wait_idle(self, timeout_s: float) -> None:
        """Returns once no request is being answered or held (a late store included)."""
        async with asyncio.timeout(timeout_s):
            while self._busy:
                await self._idle.wait()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(list(self._handlers))
        if self._server is not None:
            await self._server.wait_closed()
        if self._asgi is not None:
            await self._asgi.aclose()

    # -- HTTP/1.1, just what httpx sends: Content-Length bodies, keep-alive --

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # the client closed the connection
                request_line, *header_lines = head.decode("latin-1").split("\r\n")
                method, target, _ = request_line.split(" ", 2)
                headers: dict[str, str] = {}
                for line in header_lines:
                    if line:
                        name, value = line.split(":", 1)
                        headers[name.strip().lower()] = value.strip()
                assert "transfer-encoding" not in headers, "the stand-in reads Content-Length"
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self._busy += 1
                self._idle.clear()
                try:
                    if not await self._answer(method, target, headers, body, writer):
                        return  # a fault that hangs up
                finally:
                    self._busy -= 1
                    if not self._busy:
                        self._idle.set()
        except asyncio.CancelledError:
            pass
        finally:
            writer.close()
            # Never end cancelled: asyncio logs an error for a cancelled connection handler.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()
            self._handlers.discard(task)

    async def _answer(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Answers one request; False when the connection is to be closed without a word."""
        if not (method == "POST" and target == MESSAGES_PATH):
            self.other_calls[f"{method} {target}"] += 1
            status, answer = await self._forward(method, target, headers, body)
            await self._write(writer, status, answer, {})
            return True
        fields = json.loads(body)
        text, visitor_id = str(fields.get("text", "")), str(fields.get("visitorId", ""))
        self._attempts[text] += 1
        record = PostRecord(visitor_id, text, self._attempts[text], "")
        record.kind = self.plan.decide(text, record.attempt)
        self.posts.append(record)
        if record.kind in STATUS_FAULTS:
            status = int(record.kind)
            extra = {"x-sib-ratelimit-reset": "0"} if status == 429 else {}
            code = {429: "too_many_requests", 500: "internal_error", 502: "bad_gateway"}[status]
            error = {"code": code, "message": HTTPStatus(status).phrase}
            await self._write(writer, status, json.dumps(error).encode(), extra)
            return True
        if record.kind in LOST_BEFORE:
            if record.kind.startswith("timeout"):
                await asyncio.sleep(HOLD_S)
            return False
        if record.kind == "timeout_late":
            await asyncio.sleep(HOLD_S)  # the client has given up (and retried) by now
        status, answer = await self._forward(method, target, headers, body)
        record.stored = 200 <= status < 300
        if record.stored:
            record.message_id = str(json.loads(answer)["id"])
        if record.kind == "timeout_after":
            await asyncio.sleep(HOLD_S)
        if record.kind in LOST_AFTER:
            return False
        await self._write(writer, status, answer, {})
        return True

    async def _forward(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, bytes]:
        assert self._asgi is not None
        keep = {"api-key", "accept", "content-type"}
        response = await self._asgi.request(
            method,
            target,
            headers={k: v for k, v in headers.items() if k in keep},
            content=body,
        )
        return response.status_code, response.content

    @staticmethod
    async def _write(
        writer: asyncio.StreamWriter, status: int, body: bytes, extra: dict[str, str]
    ) -> None:
        lines = [
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
            "content-type: application/json",
            f"content-length: {len(body)}",
            *(f"{k}: {v}" for k, v in extra.items()),
        ]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()


# --- the client: retries with the same ids until OK --------------------------------------


@dataclass
class ClientTally:
    calls: Counter[str] = field(default_factory=Counter)  # RPCs wanted, by method
    attempts: Counter[str] = field(default_factory=Counter)  # RPCs made, by method
    retried_on: Counter[str] = field(default_factory=Counter)  # "<method> <code>"
    latencies_s: list[float] = field(default_factory=list)  # SendMessage, retries included


async def until_ok(
    tally: ClientTally, method: str, call: Callable[[], Awaitable[T]], seed: str
) -> T:
    """``call()`` again (same request) on a retryable status, with a tiny backoff."""
    rng = random.Random(seed)
    tally.calls[method] += 1
    for _ in range(CLIENT_MAX_ATTEMPTS):
        tally.attempts[method] += 1
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in RETRYABLE:
                raise AssertionError(
                    f"{method}: {exc.code().name} is not retryable: {exc.details()}"
                ) from None
            tally.retried_on[f"{method} {exc.code().name}"] += 1
        await asyncio.sleep(rng.uniform(0.005, 0.02))
    raise AssertionError(f"{method} still failing after {CLIENT_MAX_ATTEMPTS} attempts")


def message_text(handoff: int, n: int) -> str:
    return f"handoff {handoff:02d} message {n:02d}: where is my order?"


@dataclass
class Sent:
    """One SendMessage as its client saw it: the answers of the first and second pass."""

    handoff: int
    n: int
    client_message_id: str
    text: str
    first: pb.SendMessageResponse | None = None
    again: pb.SendMessageResponse | None = None


def service_config(folder: Path, *flags: str) -> Config:
    """Like tests/support.py's make_config, with a real API key (no built-in sandbox)."""
    return load_config(
        [
            *("--host", "127.0.0.1", "--grpc-port", "0", "--http-port", "0"),
            *("--sqlite-path", str(folder / "handoff.db"), "--brevo-agent-id", SERVICE_AGENT_ID),
            *flags,
        ],
        environ={},
    )


# --- the test ----------------------------------------------------------------------------


# Three variants, not four, to stay well under a minute on two cores: without the
# after-processing faults the claim (no duplicate at all) does not depend on the store.
@pytest.mark.parametrize(
    ("store", "after_processing"),
    [
        pytest.param("sqlite", True, id="sqlite-all_faults"),
        pytest.param("redis", True, id="redis-all_faults"),
        pytest.param("sqlite", False, id="sqlite-no_answer_lost_after_store"),
    ],
)
async def test_every_message_reaches_a_faulty_brevo_once_and_in_order(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    store: str,
    after_processing: bool,
    record_property: Callable[[str, object], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    variant = f"{store}-" + ("all_faults" if after_processing else "no_answer_lost_after_store")
    store_flags: tuple[str, ...] = ()
    if store == "redis":  # the session's redis-server (conftest.py), a key prefix of our own
        server = request.getfixturevalue("redis_server")
        prefix = "{t" + secrets.token_hex(6) + "}"
        store_flags = ("--redis-url", server.url, "--redis-key-prefix", prefix)
    sandbox = BrevoSandbox(
        api_key=API_KEY,
        auto_agent=False,
        user_prefix=USER_PREFIX,
        service_agent={"id": SERVICE_AGENT_ID, "name": "Support Bot"},
    )
    brevo = FaultyBrevo(sandbox, FaultPlan(SEED, after_processing=after_processing))
    await brevo.start()
    running: RunningService | None = None
    channel: grpc.aio.Channel | None = None
    try:
        config = service_config(
            tmp_path,
            "--brevo-api-key",
            API_KEY,
            "--brevo-base-url",
            brevo.base_url,
            "--webhook-token",
            WEBHOOK_TOKEN,
            "--brevo-timeout-seconds",
            str(BREVO_TIMEOUT_S),
            "--brevo-max-attempts",
            str(SERVICE_ATTEMPTS),
            "--user-prefix",
            USER_PREFIX,
            *store_flags,
        )
        running = await start_service(config, retry=SERVICE_RETRY)
        # Brevo's webhooks (the echo of every stored post) go to the service, as in real life.
        sandbox.set_webhook_url(running.webhook_url)
        channel = grpc.aio.insecure_channel(running.grpc_target)
        stub = pb_grpc.HandoffServiceStub(channel)
        figures = await drive(stub, brevo, running, variant, after_processing)
        await running.grpc.calls.wait_idle(5)
    finally:
        if channel is not None:
            await channel.close()
        if running is not None:
            await running.stop(1.0)
        await brevo.aclose()
        await sandbox.aclose()

    gc.collect()
    # Not asserted here (see test_an_abandoned_call_that_fails_logs_no_asyncio_error): the
    # service's abandoned calls that failed, each logged at ERROR with a traceback.
    figures["asyncio_errors_task_exception_never_retrieved"] = len(never_retrieved(caplog))
    text = json.dumps(figures, indent=2, sort_keys=True)
    print(f"\nbrevo faults, {variant}:\n{text}")
    record_property("brevo_faults", json.dumps(figures, sort_keys=True))
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    everything: dict[str, object] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(FIGURES.read_text())
        if isinstance(loaded, dict):
            everything = loaded
    everything[variant] = figures
    FIGURES.write_text(json.dumps(everything, indent=2, sort_keys=True) + "\n")


async def drive(
    stub: pb_grpc.HandoffServiceAsyncStub,
    brevo: FaultyBrevo,
    running: RunningService,
    variant: str,
    after_processing: bool,
) -> dict[str, object]:
    """Runs the three phases, asserts, and returns the figures."""
    sandbox = brevo.sandbox
    tally = ClientTally()
    wall_started = time.perf_counter()

    # Phase 1: 50 handoffs; StartHandoff posts the opening message, and is retried too.
    async def start(h: int) -> pb.Handoff:
        request = pb.StartHandoffRequest(
            conversation_id=f"reliability-{h:02d}",
            title=f"Order question {h:02d}",
            user=pb.User(id=f"user-{h:02d}", name=f"User {h:02d}"),
        )

        async def call() -> pb.StartHandoffResponse:
            return await stub.StartHandoff(request, timeout=RPC_DEADLINE_S)

        response = await until_ok(tally, "StartHandoff", call, f"{SEED}|start|{h}")
        return response.handoff

    started = time.perf_counter()
    handoffs = await asyncio.gather(*(start(h) for h in range(HANDOFFS)))
    start_s = time.perf_counter() - started
    assert len({h.id for h in handoffs}) == HANDOFFS
    openings = {
        h.visitor_id: [p.text for p in brevo.posts if p.visitor_id == h.visitor_id]
        for h in handoffs
    }
    for visitor_id, texts in openings.items():
        assert texts, visitor_id
        assert not any(t.startswith(USER_PREFIX) for t in texts), visitor_id
        assert len(set(texts)) == 1, f"{visitor_id}: one opening part expected, {set(texts)}"

    # Phase 2: 20 messages per handoff, in order per handoff, all handoffs at once.
    sent = [
        [
            Sent(h, n, f"cmid-{h:02d}-{n:02d}", message_text(h, n))
            for n in range(MESSAGES_PER_HANDOFF)
        ]
        for h in range(HANDOFFS)
    ]

    async def send_all(handoff: pb.Handoff, messages: list[Sent], second_pass: bool) -> None:
        for m in messages:
            request = pb.SendMessageRequest(
                handoff_id=handoff.id, client_message_id=m.client_message_id, text=m.text
            )

            async def call(request: pb.SendMessageRequest = request) -> pb.SendMessageResponse:
                return await stub.SendMessage(request, timeout=RPC_DEADLINE_S)

            began = time.perf_counter()
            seed = f"{SEED}|send|{m.client_message_id}|{second_pass}"
            response = await until_ok(tally, "SendMessage", call, seed)
            if second_pass:
                m.again = response
            else:
                m.first = response
                tally.latencies_s.append(time.perf_counter() - began)

    posts_before_send = len(brevo.posts)
    started = time.perf_counter()
    await asyncio.gather(*(send_all(h, s, False) for h, s in zip(handoffs, sent, strict=True)))
    send_s = time.perf_counter() - started
    await brevo.wait_idle(10)  # late stores ("timeout_late") done
    await sandbox.wait_idle(30)  # every webhook (the echoes) delivered and handled

    # Phase 3: every client_message_id once more: duplicate=True, the same id, no post.
    posts_before_again = len(brevo.posts)
    first_pass_attempts = tally.attempts["SendMessage"]
    started = time.perf_counter()
    await asyncio.gather(*(send_all(h, s, True) for h, s in zip(handoffs, sent, strict=True)))
    restarts = await asyncio.gather(
        *(
            stub.StartHandoff(pb.StartHandoffRequest(conversation_id=f"reliability-{h:02d}"))
            for h in range(HANDOFFS)
        )
    )
    again_s = time.perf_counter() - started
    posts_in_second_pass = len(brevo.posts) - posts_before_again
    wall_s = time.perf_counter() - wall_started

    # --- what Brevo holds ---
    by_text: dict[str, list[PostRecord]] = defaultdict(list)
    for post in brevo.posts:
        by_text[post.text].append(post)
    expected: dict[str, list[str]] = {}  # visitor id -> the texts it must hold, in order
    for handoff, messages in zip(handoffs, sent, strict=True):
        expected[handoff.visitor_id] = [
            openings[handoff.visitor_id][0],
            *(USER_PREFIX + m.text for m in messages),
        ]
    problems: list[str] = []
    duplicates: Counter[str] = Counter()  # extra stored copies, by the fault that caused them
    extra_copies = 0
    copies_after_next_message = 0  # a duplicate the agent sees after the following message
    for visitor_id, texts in expected.items():
        thread = [str(m["text"]) for m in sandbox.messages(visitor_id)]
        unknown = set(thread) - set(texts)
        if unknown:
            problems.append(f"{visitor_id}: unexpected messages {sorted(unknown)[:3]}")
        missing = [t for t in texts if t not in thread]
        if missing:
            problems.append(f"{visitor_id}: {len(missing)} never reached Brevo, e.g. {missing[0]}")
            continue
        firsts = [thread.index(t) for t in texts]
        if firsts != sorted(firsts):
            problems.append(f"{visitor_id}: order broken, first occurrences at {firsts}")
        for t, next_first in zip(texts, firsts[1:], strict=False):
            copies_after_next_message += sum(
                1 for i, x in enumerate(thread) if x == t and i > next_first
            )
        for t in texts:
            copies = thread.count(t)
            posts = by_text[t]
            answered = [p for p in posts if p.kind == OK]
            lost = [p for p in posts if p.stored and p.kind in LOST_AFTER]
            if len(answered) != 1:
                problems.append(f"{t!r}: {len(answered)} answered posts (the service knew)")
            if copies != 1 + len(lost):
                problems.append(
                    f"{t!r}: stored {copies} times, but only {len(lost)} earlier attempt(s) "
                    "were stored with their answer lost"
                )
            extra_copies += copies - 1
            duplicates.update(p.kind for p in lost)
    assert not problems, "\n".join(problems[:30])

    # --- what the clients were told ---
    flat = [m for messages in sent for m in messages]
    for m in flat:
        assert m.first is not None
        assert m.again is not None
        answered = [p for p in by_text[USER_PREFIX + m.text] if p.kind == OK]
        assert m.first.brevo_message_id == answered[0].message_id, m.client_message_id
        assert m.again.duplicate, f"{m.client_message_id}: a resend was not a duplicate"
        assert m.again.brevo_message_id == m.first.brevo_message_id, m.client_message_id
    assert posts_in_second_pass == 0, f"resending posted {posts_in_second_pass} message(s)"
    assert all(not r.created for r in restarts)
    assert [r.handoff.id for r in restarts] == [h.id for h in handoffs]
    assert running.manager.stats["messages_to_agent"] == HANDOFFS * MESSAGES_PER_HANDOFF
    if not after_processing:
        assert extra_copies == 0

    # --- figures ---
    kinds = Counter(p.kind for p in brevo.posts)
    faulted = sum(n for k, n in kinds.items() if k != OK)
    latencies = sorted(tally.latencies_s)
    first_duplicates = sum(1 for m in flat if m.first is not None and m.first.duplicate)
    return {
        "variant": variant,
        "seed": SEED,
        "fault_rate": FAULT_RATE,
        "after_processing_faults": after_processing,
        "handoffs": HANDOFFS,
        "send_message_calls": HANDOFFS * MESSAGES_PER_HANDOFF,
        "brevo_timeout_s": BREVO_TIMEOUT_S,
        "service_attempts_per_brevo_call": SERVICE_ATTEMPTS,
        "rpc_deadline_s": RPC_DEADLINE_S,
        "brevo_message_posts": len(brevo.posts),
        "brevo_message_posts_for_openings": posts_before_send,
        "brevo_other_calls": dict(brevo.other_calls),
        "brevo_faults_by_kind": {k: n for k, n in sorted(kinds.items()) if k != OK},
        "brevo_faulted_share": round(faulted / max(len(brevo.posts), 1), 4),
        "brevo_messages_stored": sum(1 for p in brevo.posts if p.stored),
        "client_rpcs": dict(tally.calls),
        "client_attempts": dict(tally.attempts),
        "client_retries_by_code": dict(sorted(tally.retried_on.items())),
        "client_send_attempts_first_pass": first_pass_attempts,
        "send_ok_with_duplicate_true_in_first_pass": first_duplicates,
        "duplicates_stored_in_brevo": extra_copies,
        "duplicates_by_cause": dict(duplicates),
        "duplicates_unexplained": 0,
        "duplicates_after_the_next_message": copies_after_next_message,
        "second_pass_new_posts": posts_in_second_pass,
        "send_latency_s": {
            "p50": round(statistics.median(latencies), 4),
            "p99": round(latencies[int(len(latencies) * 0.99) - 1], 4),
            "max": round(latencies[-1], 4),
        },
        "service_stats": dict(sorted(running.manager.stats.items())),
        "seconds": {
            "start_handoffs": round(start_s, 2),
            "send_messages": round(send_s, 2),
            "second_pass": round(again_s, 2),
            "wall": round(wall_s, 2),
        },
        "fault_schedule_sample": [asdict(p) for p in brevo.posts if p.kind != OK][:3],
    }


def never_retrieved(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "asyncio" and "exception was never retrieved" in r.getMessage()
    ]


async def test_an_abandoned_call_that_fails_logs_no_asyncio_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """PRODUCT BUG (fails today). A call whose client gave up (deadline, hang-up) goes on in
    ``CallsInFlight`` (service/rpc/servicer.py); when that work then fails (Brevo
    unreachable), nobody retrieves its exception: asyncio logs "Task exception was never
    retrieved" at ERROR with a traceback, once per abandoned call (about 50-250 in each run
    of the test above). ``asyncio.shield`` does not mark it retrieved, contrary to the
    comment in ``CallsInFlight.run``: once the outer future is cancelled, shield removes its
    callback from the inner task (CPython 3.11.7's ``_outer_done_callback``).
    Fix: retrieve it in ``CallsInFlight._finished`` (``if not task.cancelled():
    task.exception()``), logging it at INFO or WARNING as "abandoned call failed: ...".
    """
    sandbox = BrevoSandbox(api_key=API_KEY, auto_agent=False)
    brevo = FaultyBrevo(sandbox, FaultPlan(SEED, force="timeout_before"))
    await brevo.start()
    running: RunningService | None = None
    try:
        config = service_config(
            tmp_path,
            *("--brevo-api-key", API_KEY, "--brevo-base-url", brevo.base_url),
            *("--webhook-token", WEBHOOK_TOKEN, "--brevo-timeout-seconds", "0.2"),
        )
        running = await start_service(config, retry=RetryPolicy(max_attempts=1))
        async with grpc.aio.insecure_channel(running.grpc_target) as channel:
            stub = pb_grpc.HandoffServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.StartHandoff(pb.StartHandoffRequest(conversation_id="c"), timeout=0.05)
            assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert await running.grpc.calls.wait_idle(5)  # the abandoned work failed by now
        await asyncio.sleep(0)
        gc.collect()
        assert [p.kind for p in brevo.posts] == ["timeout_before"]
    finally:
        if running is not None:
            await running.stop(1.0)
        await brevo.aclose()
        await sandbox.aclose()
    logged = never_retrieved(caplog)
    assert not logged, f"asyncio logged at ERROR: {logged[0].getMessage()}"
