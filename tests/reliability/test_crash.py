"""Crash: ``kill -9`` of the service under load, restart on the same store, nothing lost.

The claim under test: what the service acknowledged before it was killed (a 2xx to a Brevo
webhook, OK to a SendMessage) is all there after a restart on the same store, exactly
once; what it did not acknowledge can be sent again and then is there exactly once too.

The service runs as a real process (``python -m service``, DEBUG logs, its output audited
for secrets), on SQLite or on Redis (a private redis-server with ``appendfsync always``,
which stays up: only the service is killed). Brevo is the project's ``BrevoSandbox`` in
this test process, reached over loopback.

Twenty handoffs are opened, then a concurrent load runs:

- webhook deliveries of ``conversationFragment`` bodies carrying a human agent's messages,
  unique ids, 1 to 20 to a batch; a fifth of the batches delivered twice, a quarter moved
  later than their place (so that deliveries arrive out of order), and the sandbox's own
  webhooks (echoes of the service's posts) mixed in. Each delivery records whether it got
  a 2xx and which message ids it carried;
- SendMessage calls with client_message_ids, recording which got OK and their Brevo id;
- four stream readers (three handoffs from their start, one on every handoff) recording
  (cursor, event), reconnecting with their cursor as a client does.

After a seeded moment (1 to 2 s into the load, or sooner once a seeded half to three
quarters of the planned deliveries went out, never before 200 were acknowledged) the service
gets SIGKILL; the calls in flight fail and count as not acknowledged. A new process then
starts on the same store, and:

1. each handoff's log, read from its start, holds every agent message of every
   acknowledged delivery exactly once, after exactly one AgentJoined, and nothing that no
   delivery carried;
2. every SendMessage that got OK, retried with its client_message_id, answers
   duplicate=true with the same Brevo id, and Brevo holds that message exactly once;
3. every unacknowledged delivery is delivered again (and the planned ones not yet sent
   are sent) and every unacknowledged SendMessage is sent again: then each handoff's log
   is every message of the plan exactly once, the log read at the restart is a prefix of
   it (cursors and all), and every reader, resumed from its last cursor, has read exactly
   that log: what it read before the kill, then what it read after, no gap, no duplicate;
4. the handoffs still work: StartHandoff finds them without posting, and a new agent
   message reaches a live stream.

On Redis, a handoff whose SendMessage the kill cut stays leased to the dead process for
the lease's life (10 s, ``service/storage/redis_locks.py``): the first SendMessage on it
after the restart waits that long, then succeeds (figure
``seconds_longest_send_retry_after_restart``).

SendMessage is at-least-once towards Brevo for a call cut by the crash: when Brevo stored
the message but the service died before recording it, the retry posts it again (Brevo has
no idempotency key; see ``tests/reliability/test_brevo_faults.py``). The test allows a
second copy only for such a call, never for one that got OK or was never tried before.

Figures go to ``build/reliability/<test>.json`` and ``record_property``; ``-rP`` prints them.
The seed is ``CRASH_SEED`` (default below).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import signal
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import pytest
from reliability_support import record_figures
from service_process import ServiceProcess, finish, start_service_process

from service.brevo.sandbox import SANDBOX_AGENT, BrevoSandbox
from service.http_server import RunningHttpServer, start_http_server
from service.rpc.generated.handoff.v1 import handoff_pb2 as pb
from service.rpc.generated.handoff.v1 import handoff_pb2_grpc as pb_grpc

# Secrets of this test: the log audit (tests/log_audit.py) finds them by their names.
API_KEY = "xkeysib-crash0recovery-SecretKey77"
WEBHOOK_TOKEN = "tok_crash_recovery_webhook_0099"

SERVICE_AGENT_ID = "CrashTestBot00001"  # the agent the service posts as
MARTA = {"id": "CrashAgentMarta01", "name": "Marta"}  # the human agent of the load
USER_PREFIX = "Botpress User: "  # the service's default HANDOFF_USER_PREFIX

SEED = int(os.environ.get("CRASH_SEED", "20261121"))
HANDOFFS = 20
MESSAGES_PER_HANDOFF = 300  # agent messages planned per handoff
MAX_BATCH = 20  # agent messages per delivery: 1 to this
DUPLICATE_RATE = 0.2  # batches delivered a second time, later
REORDER_RATE = 0.25  # batches delivered later than their place
SENDS_PER_HANDOFF = 25  # SendMessage calls planned per handoff
WEBHOOK_WORKERS = 8  # concurrent webhook deliveries (Brevo's side)
SENDERS = 4  # concurrent SendMessage callers
READ_HANDOFFS = (0, 1, 2)  # handoffs with a reader from their start; one more reads all
KILL_WINDOW_S = (1.0, 2.0)  # the kill comes this long after the load started (seeded),
KILL_SHARE = (0.5, 0.75)  # or once this share of the planned deliveries was taken (seeded),
MIN_ACKED_DELIVERIES = 200  # ... and not before this many deliveries were acknowledged
HEARTBEAT_S = 0.5  # HANDOFF_HEARTBEAT_SECONDS: an idle stream says so this often
RPC_TIMEOUT_S = 15.0
MAX_RECONNECTS = 50  # per reader, for RESOURCE_EXHAUSTED (the reader was too slow)
BASE_CREATED_AT_MS = 1_767_226_000_000

# An event as the test compares it: (cursor, handoff id, what happened).
Event = tuple[str, str, tuple[str, ...]]


# --- the service process -----------------------------------------------------------------


def error_lines(service: ServiceProcess) -> list[str]:
    """The service's log lines at ERROR or above (one JSON object per line)."""
    found = []
    for line in service.lines:
        if not line.endswith("\n"):
            continue  # the last line of a killed process may be cut short
        try:
            record = json.loads(line)
        except ValueError:
            found.append(line)  # not a log line: a crash's traceback, say
            continue
        if not isinstance(record, dict) or record.get("level") in ("ERROR", "CRITICAL"):
            found.append(line)
    return found


# --- the plan of the load ----------------------------------------------------------------


@dataclass(frozen=True)
class Delivery:
    number: int  # place in the plan
    handoff: int
    message_ids: tuple[str, ...]
    body: bytes
    duplicate: bool  # a second delivery of an earlier batch


@dataclass(frozen=True)
class Send:
    handoff: int
    client_message_id: str
    text: str


@dataclass
class DeliveryResult:
    delivery: Delivery
    status: int  # 0: no answer (the request failed)
    outcome: str
    at: float  # time.monotonic() of the answer or the failure


@dataclass
class SendResult:
    send: Send
    brevo_message_id: str  # "": no OK
    code: grpc.StatusCode
    at: float
    duplicate: bool = False  # the answer's duplicate flag

    @classmethod
    def ok(cls, send: Send, answer: pb.SendMessageResponse) -> SendResult:
        return cls(
            send, answer.brevo_message_id, grpc.StatusCode.OK, time.monotonic(), answer.duplicate
        )


def message_id(handoff: int, n: int) -> str:
    return f"cr{handoff:02d}m{n:04d}"


def message_text(handoff: int, n: int) -> str:
    return f"agent reply {n} in handoff {handoff}"


def fragment(visitor_id: str, conversation_id: str, handoff: int, numbers: Sequence[int]) -> bytes:
    """A conversationFragment, as Brevo sends it, with Marta's messages ``numbers``."""
    body = {
        "eventName": "conversationFragment",
        "conversationId": conversation_id,
        "isNoAvailableAgent": False,
        "messages": [
            {
                "id": message_id(handoff, n),
                "type": "agent",
                "text": message_text(handoff, n),
                "html": message_text(handoff, n),
                "createdAt": BASE_CREATED_AT_MS + 1000 * n,
                "agentId": MARTA["id"],
                "agentName": MARTA["name"],
            }
            for n in numbers
        ],
        "agents": [{**MARTA, "email": "marta@example.invalid", "userpic": None}],
        "visitor": {"id": visitor_id},
    }
    return json.dumps(body).encode()


def plan_deliveries(
    rng: random.Random, handoffs: Sequence[pb.Handoff]
) -> tuple[list[Delivery], int]:
    """Every handoff's messages cut into batches of 1..MAX_BATCH, the batches of all
    handoffs interleaved, some delivered late and some twice. Returns the deliveries in the
    order they are sent, and how many first deliveries come after a delivery of newer
    messages of the same handoff (reordered)."""
    timed: list[tuple[float, int, bytes, tuple[str, ...], bool, int]] = []
    for h, handoff in enumerate(handoffs):
        n = 0
        place = 0
        while n < MESSAGES_PER_HANDOFF:
            size = min(rng.randint(1, MAX_BATCH), MESSAGES_PER_HANDOFF - n)
            numbers = range(n, n + size)
            body = fragment(handoff.visitor_id, handoff.brevo_conversation_id, h, numbers)
            ids = tuple(message_id(h, k) for k in numbers)
            when = place + rng.random()
            if rng.random() < REORDER_RATE:
                when += rng.uniform(1, 4)
            timed.append((when, h, body, ids, False, n))
            if rng.random() < DUPLICATE_RATE:
                timed.append((when + rng.uniform(0.5, 6), h, body, ids, True, n))
            n += size
            place += 1
    timed.sort(key=lambda t: t[0])
    deliveries: list[Delivery] = []
    newest: dict[int, int] = {}
    reordered = 0
    for number, (_, h, body, ids, duplicate, first) in enumerate(timed):
        deliveries.append(Delivery(number, h, ids, body, duplicate))
        if not duplicate and first < newest.get(h, -1):
            reordered += 1
        newest[h] = max(newest.get(h, -1), first)
    return deliveries, reordered


def plan_sends(rng: random.Random) -> list[Send]:
    sends = [
        Send(h, f"crash-{h:02d}-{k:03d}", f"user message {k} in handoff {h}")
        for k in range(SENDS_PER_HANDOFF)
        for h in range(HANDOFFS)
    ]
    # Each handoff's own sends keep their order; the handoffs interleave at random.
    keyed = sorted((j // HANDOFFS + rng.random(), j) for j in range(len(sends)))
    return [sends[j] for _, j in keyed]


class Laps:
    """Seconds spent in each phase, for the figures."""

    def __init__(self) -> None:
        self._last = time.monotonic()
        self.seconds: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.monotonic()
        self.seconds[phase] = round(now - self._last, 2)
        self._last = now


# --- the load ----------------------------------------------------------------------------


def summary(event: pb.HandoffEvent) -> tuple[str, ...]:
    kind = event.WhichOneof("payload")
    if kind == "agent_joined":
        return ("joined", event.agent_joined.agent.id, event.agent_joined.agent.name)
    if kind == "agent_message":
        m = event.agent_message
        return ("message", m.brevo_message_id, m.agent.id, m.agent.name, m.text)
    return (str(kind),)  # never expected here: the comparisons then fail


@dataclass
class Reader:
    handoff_id: str  # "": every handoff's events
    events: list[Event] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    reconnects: int = 0
    cut_with: grpc.StatusCode | None = None  # how the kill ended its stream

    @property
    def cursor(self) -> str:
        return self.events[-1][0] if self.events else ""


@dataclass
class Load:
    deliveries: deque[Delivery]
    sends: deque[Send]
    delivered: list[DeliveryResult] = field(default_factory=list)
    sent: list[SendResult] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    killed_at: float = 0.0

    def acknowledged(self) -> int:
        return sum(1 for r in self.delivered if 200 <= r.status < 300)


async def deliver(http: httpx.AsyncClient, url: str, load: Load) -> None:
    """One of Brevo's delivery workers: posts planned deliveries until the load stops."""
    while load.deliveries and not load.stop.is_set():
        delivery = load.deliveries.popleft()
        try:
            response = await http.post(
                url, content=delivery.body, headers={"content-type": "application/json"}
            )
        except httpx.HTTPError:
            load.delivered.append(DeliveryResult(delivery, 0, "", time.monotonic()))
            continue
        outcome = ""
        if response.status_code == 200:
            outcome = str(response.json().get("outcome"))
        load.delivered.append(
            DeliveryResult(delivery, response.status_code, outcome, time.monotonic())
        )


async def send_messages(
    stub: pb_grpc.HandoffServiceAsyncStub, handoff_ids: Sequence[str], load: Load
) -> None:
    """One bot backend calling SendMessage until the load stops."""
    while load.sends and not load.stop.is_set():
        send = load.sends.popleft()
        request = pb.SendMessageRequest(
            handoff_id=handoff_ids[send.handoff],
            client_message_id=send.client_message_id,
            text=send.text,
        )
        try:
            answer = await stub.SendMessage(request, timeout=RPC_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            load.sent.append(SendResult(send, "", exc.code(), time.monotonic()))
            continue
        assert not answer.duplicate, send
        load.sent.append(SendResult.ok(send, answer))


async def read_stream(stub: pb_grpc.HandoffServiceAsyncStub, reader: Reader, load: Load) -> None:
    """A client reading a stream; after RESOURCE_EXHAUSTED (too slow) it resumes from its
    cursor. It ends when the kill cuts its stream."""
    for _ in range(MAX_RECONNECTS):
        call = stub.StreamAgentReplies(
            pb.StreamAgentRepliesRequest(handoff_id=reader.handoff_id, after_cursor=reader.cursor)
        )
        try:
            async for item in call:
                if item.WhichOneof("item") == "heartbeat":
                    reader.ready.set()
                    continue
                event = item.event
                reader.events.append((event.cursor, event.handoff_id, summary(event)))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                assert reader.cursor or reader.handoff_id, "cut off before its first event"
                reader.reconnects += 1
                continue
            if not load.stop.is_set():
                raise
            reader.cut_with = exc.code()
            return
        finally:
            call.cancel()
        raise AssertionError(f"the stream of {reader.handoff_id or 'all handoffs'} completed")
    raise AssertionError(f"reader of {reader.handoff_id or 'all handoffs'} reconnected too often")


async def read_until_idle(
    stub: pb_grpc.HandoffServiceAsyncStub, handoff_id: str, after_cursor: str = ""
) -> list[Event]:
    """Every event of the stream up to its first heartbeat: all there is, for now."""
    events: list[Event] = []
    call = stub.StreamAgentReplies(
        pb.StreamAgentRepliesRequest(handoff_id=handoff_id, after_cursor=after_cursor)
    )
    try:
        async with asyncio.timeout(30):
            async for item in call:
                if item.WhichOneof("item") == "heartbeat":
                    return events
                event = item.event
                events.append((event.cursor, event.handoff_id, summary(event)))
    finally:
        call.cancel()
    raise AssertionError(f"the stream of {handoff_id or 'all handoffs'} ended")


# --- the test ----------------------------------------------------------------------------


def joined() -> tuple[str, ...]:
    return ("joined", MARTA["id"], MARTA["name"])


def agent_message(handoff: int, n: int) -> tuple[str, ...]:
    return ("message", message_id(handoff, n), MARTA["id"], MARTA["name"], message_text(handoff, n))


def number_of(message_id_: str) -> int:
    """The n of message_id(h, n); -1 for an id of another shape."""
    tail = message_id_.rsplit("m", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def check_log(h: int, log: list[Event], handoff_id: str, must: set[str], may: set[str]) -> set[str]:
    """The log of handoff ``h``: AgentJoined, then Marta's messages, each once, holding every
    id of ``must`` and none outside ``may``. Returns the ids it holds."""
    assert all(e[1] == handoff_id for e in log), f"handoff {h}: another handoff's event"
    assert len({e[0] for e in log}) == len(log), f"handoff {h}: a cursor twice"
    if not must and not log:
        return set()
    assert log, f"handoff {h}: empty log, {len(must)} acknowledged messages"
    assert log[0][2] == joined(), f"handoff {h} starts with {log[0][2]}"
    for e in log[1:]:
        assert e[2][0] == "message", f"handoff {h}: unexpected {e[2]}"
        assert e[2] == agent_message(h, number_of(e[2][1])), f"handoff {h}: altered {e[2]}"
    ids = [e[2][1] for e in log[1:]]
    twice = sorted(i for i, c in Counter(ids).items() if c > 1)
    assert not twice, f"handoff {h}: messages in the log more than once: {twice[:10]}"
    held = set(ids)
    lost = sorted(must - held)
    assert not lost, f"handoff {h}: {len(lost)} acknowledged messages lost: {lost[:10]}"
    invented = sorted(held - may)
    assert not invented, f"handoff {h}: messages no delivery carried: {invented[:10]}"
    return held


@pytest.mark.parametrize("store", ["sqlite", "redis"])
async def test_kill_9_under_load_loses_nothing_acknowledged(
    store: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    record_property: Callable[[str, object], None],
) -> None:
    began = time.monotonic()
    rng = random.Random(f"{SEED}|{store}")
    own = ("BREVO_", "HANDOFF_", "REDIS_", "WEBHOOK_", "GRPC_", "SANDBOX_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(own)}
    env.update(
        BREVO_API_KEY=API_KEY,
        BREVO_AGENT_ID=SERVICE_AGENT_ID,
        WEBHOOK_TOKEN=WEBHOOK_TOKEN,
        HANDOFF_HOST="127.0.0.1",
        HANDOFF_HEARTBEAT_SECONDS=str(HEARTBEAT_S),
        HANDOFF_LOG_LEVEL="DEBUG",
        PYTHONUNBUFFERED="1",
    )
    if store == "sqlite":
        env["HANDOFF_SQLITE_PATH"] = str(tmp_path / "handoff.db")
    else:
        redis_server = request.getfixturevalue("private_redis")  # tests/conftest.py
        env["REDIS_URL"] = str(redis_server.url)
        env["REDIS_KEY_PREFIX"] = f"{{crash{secrets.token_hex(4)}}}"

    sandbox = BrevoSandbox(api_key=API_KEY, auto_agent=False)
    brevo: RunningHttpServer = await start_http_server(sandbox.app, "127.0.0.1", 0)
    env["BREVO_BASE_URL"] = f"{brevo.base_url}/v3"
    http = httpx.AsyncClient(timeout=RPC_TIMEOUT_S)
    services: list[ServiceProcess] = []
    tasks: list[asyncio.Task[None]] = []  # the load's, cancelled here if the test fails
    try:
        first = await start_service_process("before the kill", env, WEBHOOK_TOKEN)
        services.append(first)
        sandbox.set_webhook_url(first.webhook_url)
        figures = await crash_and_check(store, first, env, services, tasks, sandbox, http, rng)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for service in services:
            await finish(service, kill=True)
        await http.aclose()
        await sandbox.aclose()
        await brevo.stop(1)
    for service in services:
        for secret in (API_KEY, WEBHOOK_TOKEN):
            assert secret not in service.log, f"service {service.name} logged a secret"
    figures["seconds_total"] = round(time.monotonic() - began, 1)
    record_figures(request, record_property, figures)
    print(f"crash ({store}): {json.dumps(figures, indent=1)}")


async def crash_and_check(
    store: str,
    first: ServiceProcess,
    env: dict[str, str],
    services: list[ServiceProcess],
    tasks: list[asyncio.Task[None]],
    sandbox: BrevoSandbox,
    http: httpx.AsyncClient,
    rng: random.Random,
) -> dict[str, object]:
    laps = Laps()
    # --- set-up: the handoffs, each with its Brevo chat known to the service -------------
    started = await asyncio.gather(
        *(
            first.stub.StartHandoff(
                pb.StartHandoffRequest(conversation_id=f"crash-conv-{h}", title=f"case {h}"),
                timeout=RPC_TIMEOUT_S,
            )
            for h in range(HANDOFFS)
        )
    )
    await sandbox.wait_idle()  # the opening's echo names Brevo's chat
    handoffs = [
        (
            await first.stub.GetHandoff(
                pb.GetHandoffRequest(handoff_id=s.handoff.id), timeout=RPC_TIMEOUT_S
            )
        ).handoff
        for s in started
    ]
    assert all(h.brevo_conversation_id for h in handoffs)
    ids = [h.id for h in handoffs]
    index = {handoff_id: h for h, handoff_id in enumerate(ids)}
    openings = {h.visitor_id: sandbox.messages(h.visitor_id) for h in handoffs}
    assert all(len(m) == 1 for m in openings.values()), openings

    plan, reordered = plan_deliveries(rng, handoffs)
    send_plan = plan_sends(rng)
    carried: dict[int, set[str]] = {h: set() for h in range(HANDOFFS)}
    load = Load(deque(plan), deque(send_plan))
    laps.lap("set_up")

    # --- the load, and the kill -----------------------------------------------------------
    readers = [Reader(ids[h]) for h in READ_HANDOFFS] + [Reader("")]
    reading = [asyncio.create_task(read_stream(first.stub, r, load)) for r in readers]
    tasks += reading
    await asyncio.wait_for(asyncio.gather(*(r.ready.wait() for r in readers)), 10)
    load_began = time.monotonic()
    workers = [
        *(
            asyncio.create_task(deliver(http, first.webhook_url, load))
            for _ in range(WEBHOOK_WORKERS)
        ),
        *(asyncio.create_task(send_messages(first.stub, ids, load)) for _ in range(SENDERS)),
    ]
    tasks += workers
    # The moment of the kill: a seeded time into the load, or sooner when a seeded share of
    # the planned deliveries is taken (a fast machine), never before MIN_ACKED_DELIVERIES.
    kill_after_s = rng.uniform(*KILL_WINDOW_S)
    keep = round(len(plan) * (1 - rng.uniform(*KILL_SHARE)))

    def kill_now() -> bool:
        if load.acknowledged() < MIN_ACKED_DELIVERIES:
            return False
        return time.monotonic() - load_began >= kill_after_s or len(load.deliveries) <= keep

    async with asyncio.timeout(30):
        while not kill_now():  # noqa: ASYNC110 (the load's progress)
            await asyncio.sleep(0.005)
    assert load.deliveries, "the deliveries ran out before the kill: plan more"
    assert load.sends, "the sends ran out before the kill: plan more"
    assert all(not w.done() for w in workers), [w for w in workers if w.done()]
    load.stop.set()
    load.killed_at = time.monotonic()
    first.process.kill()  # SIGKILL: no goodbye to anyone
    sandbox.set_webhook_url("")  # while it is down, Brevo's own deliveries fail and are dropped
    assert await asyncio.wait_for(first.process.wait(), 10) == -signal.SIGKILL
    load_s = load.killed_at - load_began
    await asyncio.wait_for(asyncio.gather(*workers, *reading), 20)
    laps.lap("load_and_kill")

    # What was acknowledged, and what was not.
    for result in load.delivered:
        carried[result.delivery.handoff].update(result.delivery.message_ids)
    acked = [r for r in load.delivered if 200 <= r.status < 300]
    failed = [r for r in load.delivered if not 200 <= r.status < 300]
    assert all(r.status == 0 and r.at >= load.killed_at for r in failed), [
        (r.status, r.at - load.killed_at) for r in failed
    ]
    acked_ids: dict[int, set[str]] = {h: set() for h in range(HANDOFFS)}
    for r in acked:
        acked_ids[r.delivery.handoff].update(r.delivery.message_ids)
    sends_ok = [s for s in load.sent if s.code == grpc.StatusCode.OK]
    sends_failed = [s for s in load.sent if s.code != grpc.StatusCode.OK]
    assert all(
        s.code == grpc.StatusCode.UNAVAILABLE and s.at >= load.killed_at for s in sends_failed
    ), [(s.code, s.at - load.killed_at) for s in sends_failed]
    assert all(r.cut_with == grpc.StatusCode.UNAVAILABLE for r in readers), [
        r.cut_with for r in readers
    ]
    assert failed or sends_failed, "nothing was in flight at the kill"
    assert sends_ok, "no SendMessage got OK before the kill"
    assert not error_lines(first), error_lines(first)[:5]

    # --- the restart on the same store ----------------------------------------------------
    second = await start_service_process("after the restart", env, WEBHOOK_TOKEN)
    services.append(second)
    restart_s = time.monotonic() - load.killed_at
    stub = second.stub
    laps.lap("restart")

    # 1. Every acknowledged agent message is in its handoff's log, once.
    at_restart = await asyncio.gather(*(read_until_idle(stub, i) for i in ids))
    for h, log in enumerate(at_restart):
        check_log(h, log, ids[h], acked_ids[h], carried[h])
    for reader in readers[:-1]:
        h = index[reader.handoff_id]
        assert reader.events == at_restart[h][: len(reader.events)], f"reader of handoff {h}"

    laps.lap("check_acknowledged_deliveries")

    # 2. Every SendMessage that got OK is known, and Brevo holds it once.
    async def retry(s: SendResult) -> tuple[pb.SendMessageResponse, float]:
        began = time.monotonic()
        answer = await stub.SendMessage(
            pb.SendMessageRequest(
                handoff_id=ids[s.send.handoff],
                client_message_id=s.send.client_message_id,
                text=s.send.text,
            ),
            timeout=RPC_TIMEOUT_S,
        )
        return answer, time.monotonic() - began

    retried = await asyncio.gather(*(retry(s) for s in sends_ok))
    for s, (answer, _) in zip(sends_ok, retried, strict=True):
        assert answer.duplicate, s
        assert answer.brevo_message_id == s.brevo_message_id, s
    brevo_now = {h.visitor_id: sandbox.messages(h.visitor_id) for h in handoffs}
    for s in sends_ok:
        thread = brevo_now[handoffs[s.send.handoff].visitor_id]
        copies = [m for m in thread if m["text"] == USER_PREFIX + s.send.text]
        assert [m["id"] for m in copies] == [s.brevo_message_id], (s, copies)

    laps.lap("check_acknowledged_sends")

    # --- 3. everything not acknowledged, again; then every plan is complete ---------------
    sandbox.set_webhook_url(second.webhook_url)
    again = Load(
        deque([r.delivery for r in failed] + list(load.deliveries)),
        deque([s.send for s in sends_failed] + list(load.sends)),
    )
    redelivered, resent = len(again.deliveries), len(again.sends)
    never_tried = {s.client_message_id for s in load.sends}
    await asyncio.wait_for(
        asyncio.gather(
            *(deliver(http, second.webhook_url, again) for _ in range(WEBHOOK_WORKERS)),
            *(send_messages_after(stub, ids, again) for _ in range(SENDERS)),
        ),
        60,
    )
    assert all(r.status == 200 for r in again.delivered), Counter(r.status for r in again.delivered)
    assert all(s.code == grpc.StatusCode.OK for s in again.sent), Counter(
        s.code for s in again.sent
    )
    assert len(again.delivered) == redelivered
    assert len(again.sent) == resent

    laps.lap("send_the_rest")
    final = await asyncio.gather(*(read_until_idle(stub, i) for i in ids))
    everything = {
        h: {message_id(h, n) for n in range(MESSAGES_PER_HANDOFF)} for h in range(HANDOFFS)
    }
    events_verified = 0
    for h, log in enumerate(final):
        check_log(h, log, ids[h], everything[h], everything[h])
        assert log[: len(at_restart[h])] == at_restart[h], f"handoff {h}: the log changed"
        events_verified += len(log)
    # The readers, resumed from their cursors, read exactly the log.
    resumed = await asyncio.gather(
        *(read_until_idle(stub, r.handoff_id, r.cursor) for r in readers)
    )
    for reader, after in zip(readers[:-1], resumed[:-1], strict=True):
        h = index[reader.handoff_id]
        assert reader.events + after == final[h], f"reader of handoff {h}"
    everyone = readers[-1].events + resumed[-1]
    assert len({e[0] for e in everyone}) == len(everyone), "the all-handoffs reader: a cursor twice"
    assert len(everyone) == sum(len(log) for log in final), "the all-handoffs reader"
    for h, log in enumerate(final):
        seen = [e[2] for e in everyone if e[1] == ids[h]]
        assert seen == [e[2] for e in log], f"the all-handoffs reader, handoff {h}"

    # Brevo got each resent message: once, or twice for a call the kill cut after Brevo
    # stored it (Brevo has no idempotency key); never twice one tried only after the restart.
    brevo_end = {h.visitor_id: sandbox.messages(h.visitor_id) for h in handoffs}
    posted_twice = 0
    for resend in again.sent:
        thread = brevo_end[handoffs[resend.send.handoff].visitor_id]
        posted = [str(m["id"]) for m in thread if m["text"] == USER_PREFIX + resend.send.text]
        assert resend.brevo_message_id in posted, (resend, posted)
        if resend.send.client_message_id in never_tried:
            assert not resend.duplicate, resend
        # duplicate=true: the cut call's record had landed, so nothing was posted again.
        cut = resend.send.client_message_id not in never_tried and not resend.duplicate
        assert 1 <= len(posted) <= (2 if cut else 1), (resend, posted)
        posted_twice += len(posted) - 1
    for handoff in handoffs:
        texts = [str(m["text"]) for m in brevo_end[handoff.visitor_id]]
        assert texts[0] == openings[handoff.visitor_id][0]["text"]
        assert sum(not t.startswith(USER_PREFIX) for t in texts) == 1, "opening posted again"

    laps.lap("check_everything")

    # --- 4. the handoffs still work ---------------------------------------------------------
    for h, handoff in enumerate(handoffs[:3]):
        reopened = await stub.StartHandoff(
            pb.StartHandoffRequest(conversation_id=f"crash-conv-{h}"), timeout=RPC_TIMEOUT_S
        )
        assert not reopened.created
        assert reopened.handoff.id == handoff.id
    await sandbox.wait_idle()
    live = stub.StreamAgentReplies(
        pb.StreamAgentRepliesRequest(handoff_id=ids[0], after_cursor=final[0][-1][0])
    )
    try:
        heartbeat = await asyncio.wait_for(live.read(), 10)  # the stream is live
        assert isinstance(heartbeat, pb.StreamAgentRepliesResponse)
        assert heartbeat.WhichOneof("item") == "heartbeat"
        said = await sandbox.agent_says(handoffs[0].visitor_id, "still here after the crash")
        fresh: list[tuple[str, ...]] = []
        while len(fresh) < 2:
            item = await asyncio.wait_for(live.read(), 10)
            assert isinstance(item, pb.StreamAgentRepliesResponse)
            if item.WhichOneof("item") == "event":
                fresh.append(summary(item.event))
    finally:
        live.cancel()
    sam = (SANDBOX_AGENT["id"], SANDBOX_AGENT["name"])
    assert fresh == [("joined", *sam), ("message", str(said["id"]), *sam, str(said["text"]))]

    assert not error_lines(second), error_lines(second)[:5]
    assert await finish(second, kill=False) == 0
    laps.lap("still_works_and_stop")

    return {
        "store": store,
        "seed": SEED,
        "handoffs": HANDOFFS,
        "load_seconds_before_kill": round(load_s, 2),
        "deliveries_planned": len(plan),
        "deliveries_reordered_in_plan": reordered,
        "deliveries_duplicated_in_plan": sum(d.duplicate for d in plan),
        "deliveries_acknowledged_before_kill": len(acked),
        "acknowledged_outcomes": dict(Counter(r.outcome for r in acked)),
        "messages_acknowledged_before_kill": sum(len(s) for s in acked_ids.values()),
        "sends_ok_before_kill": len(sends_ok),
        "seconds_longest_send_retry_after_restart": round(max(t for _, t in retried), 2),
        "in_flight_failures": {
            "webhooks": len(failed),
            "send_message": len(sends_failed),
            "streams": len(readers),
        },
        "reader_reconnects_before_kill": sum(r.reconnects for r in readers),
        "events_read_by_readers_before_kill": sum(len(r.events) for r in readers),
        "seconds_kill_to_serving": round(restart_s, 2),
        "seconds_process_start": round(second.start_s, 2),
        "deliveries_sent_after_restart": redelivered,
        "sends_after_restart": resent,
        "sends_posted_twice_in_flight_at_kill": posted_twice,
        "events_verified": events_verified,
        "seconds_by_phase": laps.seconds,
    }


async def send_messages_after(
    stub: pb_grpc.HandoffServiceAsyncStub, handoff_ids: Sequence[str], load: Load
) -> None:
    """SendMessage after the restart: a call cut by the kill may already be known (its
    commit landed, its answer was lost), so duplicate=true is a right answer here."""
    while load.sends:
        send = load.sends.popleft()
        answer = await stub.SendMessage(
            pb.SendMessageRequest(
                handoff_id=handoff_ids[send.handoff],
                client_message_id=send.client_message_id,
                text=send.text,
            ),
            timeout=RPC_TIMEOUT_S,
        )
        load.sent.append(SendResult.ok(send, answer))
