"""Property-based fuzzing of everything a stranger can send: the webhook and every RPC.

Hypothesis generates the inputs, reproducibly (``derandomize=True``, no example database),
and shrinks a failure to its smallest form. The service runs in-process on SQLite, on an
event loop in a thread of its own (``ServiceThread``), so that hypothesis drives it from
plain synchronous tests over real loopback sockets.

For every input: a documented answer (never a 5xx, never INTERNAL or UNKNOWN), no ERROR log
record and no traceback anywhere in the process, what the webhook acknowledged is exactly
what the event log gained and every stored event can be read back from a stream; and once
the run is over, a normal handoff still goes round (StartHandoff, an agent's reply by
webhook, the reply on the stream). Each test records what it sent and what came back.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_support import ServiceThread, record_figures, watch_error_logs
from support import FIXTURES, agent_fragment, all_summaries, make_config

from service.core.brevo_payloads import KNOWN_EVENTS
from service.core.handoffs import (
    MAX_ATTACHMENTS,
    MAX_FIELD_CHARS,
    MAX_HISTORY_TURNS,
    MAX_ID_CHARS,
    MAX_MAP_ENTRIES,
    MAX_OPENING_TEXT_CHARS,
    MAX_URL_CHARS,
    HandoffSettings,
)
from service.core.inbound import ServiceIdentity
from service.core.models import encode_cursor
from service.rpc.generated.handoff.v1 import handoff_pb2 as pb

T = TypeVar("T")

WEBHOOK_LIMIT = 1_048_576  # the default WEBHOOK_MAX_BYTES (the fixture checks the config)
MAX_TEXT_CHARS = HandoffSettings(identity=ServiceIdentity("", "")).max_text_chars
GRPC_MAX_RECEIVE = 4 * 1024 * 1024  # gRPC's default limit on one request's size
MARTA = "HmN3bV7cX2zL9kJ4q"

# Hypothesis: reproducible (the same examples on every run, on every machine), no example
# database, no deadline (loopback calls vary), and no health check on slow or large data:
# large and slow inputs are the point here.
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=False,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[ServiceThread]:
    """The whole service on SQLite, heartbeats every 50 ms (so an idle stream shows it is
    open at once), on an event loop of its own thread."""
    config = make_config(tmp_path, "--heartbeat-seconds", "0.05")
    assert config.webhook_max_bytes == WEBHOOK_LIMIT
    svc = ServiceThread(config)
    try:
        yield svc
    finally:
        svc.close()


def served_normally(svc: ServiceThread, tag: str) -> None:
    """A normal handoff goes round: StartHandoff, an agent's reply by webhook, the stream."""
    h = svc.harness
    handoff = svc.run(h.start_handoff(f"after-the-fuzz-{tag}"))
    answer = svc.run(h.post(agent_fragment(handoff.visitor_id, f"after-{tag}", "still here")))
    assert (answer.status_code, answer.json()) == (200, {"outcome": "stored", "events": 2})
    events = svc.run(h.collect(handoff.id, 2))
    assert all_summaries(events) == [
        ("joined", MARTA, ""),
        ("message", f"after-{tag}", MARTA, "", "still here"),
    ]
    got = svc.call(lambda: h.stub.GetHandoff(pb.GetHandoffRequest(handoff_id=handoff.id)))
    assert got.handoff.state == pb.HANDOFF_STATE_ACTIVE


# --- Webhook bodies ---------------------------------------------------------------------

# Placeholders as long as the real values they stand for, so that a body's size does not
# change when a fresh handoff's visitor id (hf_ + 24 hex digits) replaces them.
VISITOR_SLOT = "hf_" + "V" * 24
CONVERSATION_SLOT = "bc_" + "C" * 20
FIXTURE_NAMES = sorted(p.name for p in FIXTURES.glob("*.json") if not p.name.startswith("rest_"))
PARSED_KEYS = [
    "eventName",
    "conversationId",
    "isNoAvailableAgent",
    "messages",
    "message",
    "agents",
    "visitor",
    "visitorId",
    "id",
    "type",
    "text",
    "html",
    "createdAt",
    "agentId",
    "agentName",
    "agentUserpic",
    "receivedFrom",
    "isPushed",
    "isTrigger",
    "file",
    "attachments",
    "name",
    "filename",
    "link",
    "url",
    "mimeType",
    "size",
    "isImage",
    "imageInfo",
    "width",
    "height",
    "previewLink",
    "previewUrl",
    "userpic",
]
EDGE_INTS = [
    0,
    -1,
    1,
    2**31 - 1,
    2**31,
    -(2**31) - 1,
    2**32,
    2**53 + 1,
    2**63 - 1,
    2**63,
    -(2**63),
    -(2**63) - 1,
    2**64,
    10**15,
    10**18,
    10**19,
    10**30,
    253_402_300_800_000,  # the first millisecond after year 9999
    -62_135_596_800_001,  # the last millisecond before year 1
]
EDGE_FLOATS = [1e18, 1e19, 1e308, -1e308, -0.0, 0.5, 1767225600000.5]
EDGE_STRINGS = [
    "",
    " ",
    "\x00",
    "\ud800",
    "\udfff",
    "a\udc00b",
    "\u202e",
    "\ufeff",
    "\U0001f600",
    "\n\r\t",
    "null",
    "true",
    "false",
    "0",
    "-1",
    "1e400",
    " 42 ",
    "\u0661\u0662\u0663",
    "9" * 25,
    "c1.5",
    "image/png",
    "agent",
    "visitor",
    "handoff-service",
    "Bridg3AgentId0001",
    "https://files.example.net/a.png",
    "<script>alert(1)</script>",
    "%s%n%x",
    "\\",
    '"',
]

any_char = st.characters(exclude_categories=())  # every code point, lone surrogates too
json_text = st.text(any_char, max_size=40) | st.sampled_from(EDGE_STRINGS)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from(EDGE_INTS),
    st.floats(),
    st.sampled_from(EDGE_FLOATS),
    json_text,
    st.from_regex(r"\s?-?[0-9]{1,25}\s?", fullmatch=True),
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(json_text | st.sampled_from(PARSED_KEYS), children, max_size=5)
    ),
    max_leaves=25,
)
# What a mutation writes into a field: edge values first, then anything.
nasty_values = st.one_of(
    st.sampled_from(EDGE_INTS),
    st.sampled_from(EDGE_STRINGS),
    st.sampled_from([*EDGE_FLOATS, float("nan"), float("inf"), float("-inf")]),
    json_text,
    json_values,
)


@dataclasses.dataclass(frozen=True)
class Body:
    """One webhook body; its repr stays short however large the body is."""

    family: str
    raw: bytes
    chunked: bool = False
    depth: int = 0  # nesting depth, when the family nests deliberately

    def __repr__(self) -> str:
        raw = repr(self.raw)
        if len(self.raw) > 4000:
            raw = f"{self.raw[:1500]!r} + ... + {self.raw[-1500:]!r} ({len(self.raw)} bytes)"
        return f"Body({self.family}, chunked={self.chunked}, depth={self.depth}, raw={raw})"


def dumps(value: object, ascii_only: bool) -> bytes:
    """JSON as a sender would write it: escaped ASCII, or raw UTF-8 (lone surrogates then
    become the invalid byte sequences a careless encoder writes)."""
    if ascii_only:
        return json.dumps(value).encode()
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


def base_body(name: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    if isinstance(body.get("visitor"), dict):
        body["visitor"]["id"] = VISITOR_SLOT
    body["conversationId"] = CONVERSATION_SLOT
    return body


Path_ = tuple[str | int, ...]


def paths(value: object, prefix: Path_ = ()) -> list[Path_]:
    """Every key and list item inside ``value``, as paths from its root."""
    found: list[Path_] = []
    if isinstance(value, dict):
        for key, child in value.items():
            found.append((*prefix, key))
            found.extend(paths(child, (*prefix, key)))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found.append((*prefix, index))
            found.extend(paths(child, (*prefix, index)))
    return found


def containers(value: object, kind: type, prefix: Path_ = ()) -> list[Path_]:
    found: list[Path_] = [prefix] if isinstance(value, kind) else []
    items: Any = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, child in items:
        found.extend(containers(child, kind, (*prefix, key)))
    return found


def at(root: Any, path: Path_) -> Any:
    for step in path:
        root = root[step]
    return root


@st.composite
def brevo_mutated(draw: st.DrawFn) -> Body:
    """A fixture body for a fresh handoff, with 1 to 4 mutations: wrong types in any field,
    fields removed or added, lists repeated (duplicates) or grown (many new messages)."""
    body = base_body(draw(st.sampled_from(FIXTURE_NAMES)))
    body["eventName"] = draw(st.sampled_from([*sorted(KNOWN_EVENTS), body["eventName"]]))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["replace", "replace", "delete", "add", "repeat", "grow"]))
        if action in ("replace", "delete"):
            every = paths(body)
            if not every:
                continue
            parsed = [p for p in every if p[-1] in PARSED_KEYS or isinstance(p[-1], int)]
            path = draw(st.sampled_from(parsed) | st.sampled_from(every))
            parent = at(body, path[:-1])
            if action == "replace":
                parent[path[-1]] = draw(nasty_values)
            else:
                del parent[path[-1]]
        elif action == "add":
            target = at(body, draw(st.sampled_from(containers(body, dict))))
            target[draw(st.sampled_from(PARSED_KEYS))] = draw(nasty_values)
        else:
            lists = [p for p in containers(body, list) if p]
            if not lists:
                continue
            path = draw(st.sampled_from(lists))
            items = at(body, path)
            if not items:
                continue
            count = draw(st.sampled_from([2, 10, 100, 300]))
            if action == "repeat":  # the same items again: duplicates in one delivery
                grown = [copy.deepcopy(items[i % len(items)]) for i in range(count)]
            else:  # new items: copies with ids of their own
                grown = []
                for i in range(count):
                    item = copy.deepcopy(items[i % len(items)])
                    if isinstance(item, dict):
                        item["id"] = f"grown-{i}"
                    grown.append(item)
            at(body, path[:-1])[path[-1]] = grown
    return Body("brevo_mutated", dumps(body, draw(st.booleans())))


@st.composite
def random_json(draw: st.DrawFn) -> Body:
    """Any JSON value; half the time an object with a (known or random) eventName."""
    value = draw(json_values)
    if draw(st.booleans()):
        extra = draw(st.dictionaries(st.sampled_from(PARSED_KEYS), json_values, max_size=6))
        name = draw(st.sampled_from(sorted(KNOWN_EVENTS)) | json_text | json_scalars)
        value = {**extra, "eventName": name}
        if draw(st.booleans()):
            value["visitor"] = {"id": VISITOR_SLOT}
    return Body("random_json", dumps(value, draw(st.booleans())))


@st.composite
def random_bytes(draw: st.DrawFn) -> Body:
    prefix = draw(
        st.sampled_from([b"", b"{", b'{"eventName":"conversationFragment",', b"\xef\xbb\xbf"])
    )
    tail = draw(
        st.binary(max_size=2000)
        | st.builds(lambda b, n: b * n, st.binary(min_size=1, max_size=16), st.integers(1, 20_000))
    )
    return Body("random_bytes", prefix + tail, draw(st.booleans()))


INVALID_UTF8 = [
    b"\xff",
    b"\xfe",
    b"\x80",
    b"\xc3",
    b"\xc0\xaf",
    b"\xe2\x82",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"\xf8\x88\x80\x80\x80",
]


@st.composite
def invalid_utf8(draw: st.DrawFn) -> Body:
    """A valid webhook for a fresh handoff with invalid UTF-8 sequences slipped in."""
    raw = dumps(base_body(draw(st.sampled_from(FIXTURE_NAMES))), ascii_only=False)
    for _ in range(draw(st.integers(1, 3))):
        at_ = draw(st.integers(0, len(raw)))
        bad = draw(st.sampled_from(INVALID_UTF8) | st.binary(min_size=1, max_size=4))
        raw = raw[:at_] + bad + raw[at_:]
    return Body("invalid_utf8", raw, draw(st.booleans()))


NEST_SLOT = "__NEST_HERE__"


@st.composite
def deep_nesting(draw: st.DrawFn) -> Body:
    """Arrays and objects nested from 1 to 100,000 deep, alone or inside a webhook field."""
    depth = draw(st.integers(1, 3000) | st.sampled_from([900, 1000, 5000, 100_000]))
    opener, closer = draw(st.sampled_from([(b"[", b"]"), (b'{"a":', b"}")]))
    nested = opener * depth + b"1" + closer * depth
    where = draw(st.sampled_from(["root", "text", "messages", "visitor", "file", "extra"]))
    if where == "root":
        return Body("deep_nesting", nested, depth=depth)
    body = base_body("fragment_file.json")
    if where == "text":
        body["messages"][0]["text"] = NEST_SLOT
    elif where == "file":
        body["messages"][0]["file"] = NEST_SLOT
    elif where == "extra":
        body["extra"] = NEST_SLOT
    else:
        body[where] = NEST_SLOT
    raw = dumps(body, ascii_only=True).replace(json.dumps(NEST_SLOT).encode(), nested)
    return Body("deep_nesting", raw, depth=depth)


PAD_SLOT = "__PAD_HERE__"


@st.composite
def near_limit(draw: st.DrawFn) -> Body:
    """Bodies from half the limit to just above it, padded in one field with one character
    (multi-byte, or escaped, or not); sent with a Content-Length or chunked."""
    body = base_body(draw(st.sampled_from(["fragment_minimal.json", "fragment_file.json"])))
    where = draw(st.sampled_from(["text", "html", "agentName", "extra", "visitor.id"]))
    if where == "extra":
        body["pad"] = PAD_SLOT
    elif where == "visitor.id":
        body["visitor"]["id"] = PAD_SLOT
    else:
        body["messages"][0][where] = PAD_SLOT
    char = draw(st.sampled_from(["x", "\u00e9", "\u20ac", "\U0001f600", '"', "\\", "\n", "\u2028"]))
    ascii_only = draw(st.booleans())
    target = WEBHOOK_LIMIT + draw(
        st.integers(-8, 8) | st.integers(-WEBHOOK_LIMIT // 2, 4096) | st.just(0)
    )
    slot = json.dumps(PAD_SLOT).encode()
    template = dumps(body, ascii_only)
    one = len(dumps(char, ascii_only)) - 2  # bytes per padding character
    count = max(0, (target - (len(template) - len(slot) + 2)) // one)
    raw = template.replace(slot, dumps(char * count, ascii_only), 1)
    return Body("near_limit", raw, chunked=draw(st.booleans()))


WEBHOOK_FAMILIES: dict[str, tuple[st.SearchStrategy[Body], int]] = {
    "brevo_mutated": (brevo_mutated(), 900),
    "random_json": (random_json(), 450),
    "random_bytes": (random_bytes(), 250),
    "invalid_utf8": (invalid_utf8(), 250),
    "deep_nesting": (deep_nesting(), 150),
    "near_limit": (near_limit(), 120),
}


def expected_answers(raw: bytes) -> set[str]:
    """What the gateway may answer, as documented (README, "Events from Brevo's webhooks")."""
    if len(raw) > WEBHOOK_LIMIT:
        return {"413"}
    try:
        body = json.loads(raw)
    except RecursionError:  # how deep the decoder gets depends on the caller's stack
        return {"400 nested", "400 not a webhook", "200 ignored", "200 known"}
    except ValueError:
        return {"400 not json"}
    if not isinstance(body, dict):
        return {"400 not a webhook"}
    name = body.get("eventName")
    if not isinstance(name, str) or not name:
        return {"400 not a webhook"}
    return {"200 known"} if name in KNOWN_EVENTS else {"200 ignored"}


def classify(status: int, answer: object) -> str:
    """The gateway's answer as one of the documented kinds (or a description of what it is
    not). Every documented answer is a JSON object."""
    assert isinstance(answer, dict), f"HTTP {status} answered {answer!r}, not a JSON object"
    if status == 413:
        assert set(answer) == {"error"}, answer
        return "413"
    if status == 400:
        assert set(answer) == {"error"}, answer
        error = answer["error"]
        assert isinstance(error, str), answer
        assert error, answer
        assert "\n" not in error, answer
        if "nested too deeply" in error:
            return "400 nested"
        if error.startswith("body is not valid JSON"):
            return "400 not json"
        return "400 not a webhook"
    if status == 200:
        assert set(answer) == {"outcome", "events"}, answer
        outcome, events = answer["outcome"], answer["events"]
        assert outcome in ("stored", "duplicate", "ignored_event", "unknown_visitor"), answer
        assert isinstance(events, int), answer
        assert events >= 0, answer
        assert events == 0 or outcome == "stored", answer
        return "200 ignored" if outcome == "ignored_event" else "200 known"
    raise AssertionError(f"undocumented answer HTTP {status}: {answer!r}")


@dataclasses.dataclass
class WebhookRun:
    svc: ServiceThread
    answers: Counter[str] = dataclasses.field(default_factory=Counter)
    posted: int = 0
    bytes_posted: int = 0
    largest: int = 0
    handoffs_started: int = 0
    events_stored: int = 0
    events_read_back: int = 0
    serial: Iterator[int] = dataclasses.field(default_factory=itertools.count)

    def materialize(self, raw: bytes) -> bytes:
        """Points the body at a fresh handoff of its own, and at a Brevo conversation id
        of its own, so that one example never sees another's state."""
        n = next(self.serial)
        if VISITOR_SLOT.encode() in raw:
            handoff = self.svc.run(self.svc.harness.start_handoff(f"fuzz-{n}"))
            self.handoffs_started += 1
            assert len(handoff.visitor_id) == len(VISITOR_SLOT)
            raw = raw.replace(VISITOR_SLOT.encode(), handoff.visitor_id.encode())
        return raw.replace(CONVERSATION_SLOT.encode(), f"bc_{n:020d}".encode())

    def check(self, body: Body, errors_seen: Callable[[], str]) -> None:
        svc, h = self.svc, self.svc.harness
        errors_seen()  # forget what an earlier (failed) example left
        raw = self.materialize(body.raw)
        before = svc.run(h.running.store.last_seq())
        response = svc.run(post(h.webhook_url, raw, body.chunked, svc))
        self.posted += 1
        self.bytes_posted += len(raw)
        self.largest = max(self.largest, len(raw))
        problems = errors_seen()
        assert response[0] < 500, f"HTTP {response[0]}: {response[1]!r}; logged: {problems}"
        kind = classify(*response)
        self.answers[f"{response[0]} {response[1].get('outcome', '')}".strip()] += 1
        expected = expected_answers(raw)
        if kind == "400 nested" and body.depth >= 500:
            expected.add(kind)  # the service's stack ran out where the test's did not
        assert kind in expected, f"answered {kind} ({response[1]!r}), expected {expected}"
        assert not problems, f"error log records: {problems}"
        # Nothing is lost: what the answer acknowledged is exactly what the log gained,
        # and every event can be read back from a stream.
        after = svc.run(h.running.store.last_seq())
        stored = response[1].get("events", 0) if response[1].get("outcome") == "stored" else 0
        assert after - before == stored, f"log gained {after - before}, answer said {stored}"
        if stored:
            events = svc.run(h.collect("", stored, after_cursor=encode_cursor(before)))
            assert [e.cursor for e in events] == [
                encode_cursor(before + i + 1) for i in range(stored)
            ]
            assert len({e.handoff_id for e in events}) == 1
            self.events_stored += stored
            self.events_read_back += len(events)
        problems = errors_seen()
        assert not problems, f"error log records: {problems}"


async def post(url: str, raw: bytes, chunked: bool, svc: ServiceThread) -> tuple[int, Any]:
    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(raw), 65536):
            yield raw[start : start + 65536]

    response = await svc.harness.http.post(url, content=chunks() if chunked else raw)
    try:
        answer: Any = response.json()
    except ValueError:
        answer = response.text[:300]
    return response.status_code, answer


@pytest.mark.parametrize("family", list(WEBHOOK_FAMILIES))
def test_webhook_fuzz(
    family: str,
    service: ServiceThread,
    request: pytest.FixtureRequest,
    record_property: Callable[[str, object], None],
) -> None:
    """Every body gets a documented answer (200 stored/duplicate/ignored_event/
    unknown_visitor, 400 {"error"}, 413), never a 5xx or an error in the logs; the log
    gains exactly what was acknowledged, readable from a stream; the service still serves."""
    strategy, examples = WEBHOOK_FAMILIES[family]
    run = WebhookRun(service)
    started = time.monotonic()
    with watch_error_logs() as watch:
        mark = [0]

        def errors_seen() -> str:
            found = watch.describe(mark[0])
            mark[0] = len(watch.records)
            return found

        @settings(FUZZ, max_examples=examples)
        @given(body=strategy)
        def webhook_answers_as_documented(body: Body) -> None:
            run.check(body, errors_seen)

        try:
            webhook_answers_as_documented()
            served_normally(service, family)
            assert not watch.records, watch.describe()
        finally:
            record_figures(
                request,
                record_property,
                {
                    "family": family,
                    "bodies_posted": run.posted,
                    "bytes_posted": run.bytes_posted,
                    "largest_body_bytes": run.largest,
                    "answers": dict(sorted(run.answers.items())),
                    "fresh_handoffs": run.handoffs_started,
                    "events_stored": run.events_stored,
                    "events_read_back": run.events_read_back,
                    "error_log_records": len(watch.records),
                    "duration_s": round(time.monotonic() - started, 2),
                },
            )
    assert run.posted >= examples


# --- RPC requests -----------------------------------------------------------------------

rpc_char = st.characters(codec="utf-8")  # proto strings are valid UTF-8: no surrogates
RPC_EDGE_STRINGS = [s for s in EDGE_STRINGS if not any(0xD800 <= ord(c) <= 0xDFFF for c in s)]
long_text = st.builds(
    lambda char, count: char * count,
    st.sampled_from(["x", "\u00e9", "\U0001f600", " ", "\x00", "\n", "\u200b", "\x1f"]),
    st.sampled_from([127, 128, 129, 199, 200, 201, 2048, 2049, 10_000, 10_001, 60_000]),
)


def rpc_text(max_size: int = 40) -> st.SearchStrategy[str]:
    return st.text(rpc_char, max_size=max_size) | st.sampled_from(RPC_EDGE_STRINGS) | long_text


def string_maps() -> st.SearchStrategy[dict[str, str]]:
    small = st.dictionaries(rpc_text(20), rpc_text(20), max_size=4)
    big = st.builds(
        lambda count, key, value: {f"{key}{i}": value for i in range(count)},
        st.sampled_from([MAX_MAP_ENTRIES - 1, MAX_MAP_ENTRIES, MAX_MAP_ENTRIES + 1, 1000]),
        st.text(rpc_char, max_size=10),
        st.text(rpc_char, max_size=30),
    )
    return small | big


TIMESTAMP_SECONDS = [0, -1, 253_402_300_799, 253_402_300_800, -62_135_596_800, -62_135_596_801]
timestamps = st.builds(
    lambda s, n: Timestamp(seconds=s, nanos=n),
    st.integers(-(2**63), 2**63 - 1) | st.sampled_from(TIMESTAMP_SECONDS),
    st.integers(-(2**31), 2**31 - 1) | st.sampled_from([0, 999_999_999, 1_000_000_000, -1]),
)
roles = st.sampled_from([pb.ROLE_USER, pb.ROLE_BOT, pb.ROLE_UNSPECIFIED, 3, -1, 2**31 - 1])
turns = st.builds(
    lambda role, text, time: pb.HistoryTurn(role=role, text=text, time=time),
    roles,
    rpc_text(),
    st.none() | timestamps,
)
histories = st.lists(turns, max_size=5) | st.builds(
    lambda turn, count: [turn] * count,
    turns.filter(lambda t: len(t.text) <= 200),
    st.sampled_from([MAX_HISTORY_TURNS - 1, MAX_HISTORY_TURNS, MAX_HISTORY_TURNS + 1, 5000]),
)
users = st.builds(
    lambda i, n, e, p, a: pb.User(id=i, name=n, email=e, picture_url=p, attributes=a),
    rpc_text(),
    rpc_text(),
    rpc_text(),
    rpc_text(),
    string_maps(),
)
start_requests = st.builds(
    lambda c, u, t, d, h, m: pb.StartHandoffRequest(
        conversation_id=c, user=u, title=t, description=d, history=h, metadata=m
    ),
    rpc_text(),
    users,
    rpc_text(),
    rpc_text(),
    histories,
    string_maps(),
)
URLS = [
    "https://files.example.net/label.png",
    "http://x",
    "https://",
    "ftp://files.example.net/a",
    "",
    "https://a b",
    "https://a\nb",
    "https://a\tb",
    "HTTPS://UPPER.example",
    "javascript:alert(1)",
]
attachment = st.builds(
    lambda url, name, mime, kind, size, w, h, preview: pb.Attachment(
        url=url,
        name=name,
        mime_type=mime,
        kind=kind,
        size_bytes=size,
        width=w,
        height=h,
        preview_url=preview,
    ),
    st.sampled_from(URLS)
    | st.builds(lambda tail: "https://" + tail, rpc_text())
    | st.just("https://" + "x" * (MAX_URL_CHARS - 8))
    | st.just("https://" + "x" * (MAX_URL_CHARS - 7)),
    rpc_text(),
    rpc_text(20),
    st.integers(-(2**31), 2**31 - 1) | st.sampled_from([0, 1, 2, 3, 4]),
    st.integers(-(2**63), 2**63 - 1),
    st.integers(-(2**31), 2**31 - 1),
    st.integers(-(2**31), 2**31 - 1),
    rpc_text(),
)
no_attachments: list[pb.Attachment] = []
attachment_lists = (
    st.just(no_attachments)
    | st.lists(attachment, max_size=3)
    | st.builds(
        lambda a, count: [a] * count,
        attachment,
        st.sampled_from([MAX_ATTACHMENTS, MAX_ATTACHMENTS + 1, 1000]),
    )
)
# A handoff to name: one of the test's own (open or ended), or any string at all.
handoff_refs = st.sampled_from(["<open>", "<ended>"]) | rpc_text()


def bad_id(value: str) -> bool:
    return not value.strip() or len(value) > MAX_ID_CHARS


def bad_map(values: dict[str, str]) -> bool:
    return len(values) > MAX_MAP_ENTRIES or any(
        len(k) > 128 or len(v) > 2048 for k, v in values.items()
    )


def valid_time(ts: Timestamp) -> bool:
    return -62_135_596_800 <= ts.seconds <= 253_402_300_799 and 0 <= ts.nanos < 10**9


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What a request must get: ``codes`` (by name), and for INVALID_ARGUMENT the fields
    its message may start with (README: "the message starts with the field's name")."""

    codes: frozenset[str]
    fields: tuple[str, ...] = ()

    @staticmethod
    def of(*codes: str, fields: tuple[str, ...] = ()) -> Verdict:
        return Verdict(frozenset(codes), fields)


def start_verdict(req: pb.StartHandoffRequest) -> Verdict:
    definite: list[str] = []  # documented: rejected whatever the limits
    limits: list[str] = []  # the service's own size limits
    if not req.conversation_id.strip():
        definite.append("conversation_id")
    if len(req.conversation_id) > MAX_ID_CHARS:
        limits.append("conversation_id")
    if any(t.role not in (pb.ROLE_USER, pb.ROLE_BOT) for t in req.history):
        definite.append("history")
    if len(req.history) > MAX_HISTORY_TURNS:
        limits.append("history")
    if bad_map(dict(req.user.attributes)):
        limits.append("user.attributes")
    if bad_map(dict(req.metadata)):
        limits.append("metadata")
    user = req.user
    for name, value in (
        ("user.id", user.id),
        ("user.name", user.name),
        ("user.email", user.email),
        ("user.picture_url", user.picture_url),
        ("title", req.title),
    ):
        if len(value) > MAX_FIELD_CHARS:
            limits.append(name)
    if len(req.description) + sum(len(t.text) for t in req.history) > MAX_OPENING_TEXT_CHARS:
        limits.append("history")
    odd_time = any(t.HasField("time") and not valid_time(t.time) for t in req.history)
    if definite or limits:  # the message may name any of them (or an odd time: below)
        return Verdict.of("INVALID_ARGUMENT", fields=(*definite, *limits, "history"))
    if odd_time:  # a time outside the years 1-9999: ignored or refused, either is fine
        return Verdict.of("OK", "INVALID_ARGUMENT", fields=("history",))
    return Verdict.of("OK")


def send_violations(req: pb.SendMessageRequest) -> list[str]:
    found: list[str] = []
    if bad_id(req.handoff_id):
        found.append("handoff_id")
    if bad_id(req.client_message_id):
        found.append("client_message_id")
    if (not req.text.strip() and not req.attachments) or len(req.text) > MAX_TEXT_CHARS:
        found.append("text")
    if len(req.attachments) > MAX_ATTACHMENTS or any(
        not a.url.startswith(("https://", "http://"))
        or len(a.url) > MAX_URL_CHARS
        or any(ch in a.url for ch in " \n\r\t")
        for a in req.attachments
    ):
        found.append("attachments")
    return found


CURSOR = re.compile(r"c1\.[0-9]{1,18}")


@dataclasses.dataclass
class RpcRun:
    svc: ServiceThread
    codes: Counter[str] = dataclasses.field(default_factory=Counter)
    calls: int = 0
    serial: Iterator[int] = dataclasses.field(default_factory=itertools.count)
    open_id: str = ""
    ended_id: str = ""
    cursors: list[str] = dataclasses.field(default_factory=list)
    errors_seen: Callable[[], str] = lambda: ""

    def prepare(self) -> None:
        """An open handoff with events, and an ended one."""
        h = self.svc.harness
        opened = self.svc.run(h.start_handoff("rpc-fuzz-open"))
        self.svc.run(h.post(agent_fragment(opened.visitor_id, "rpc-1", "hello", 1)))
        ended = self.svc.run(h.start_handoff("rpc-fuzz-ended"))
        self.svc.run(h.post(agent_fragment(ended.visitor_id, "rpc-2", "bye", 2)))
        self.svc.call(lambda: h.stub.StopHandoff(pb.StopHandoffRequest(handoff_id=ended.id)))
        self.open_id, self.ended_id = opened.id, ended.id
        events = self.svc.run(h.collect(ended.id, 3)) + self.svc.run(h.collect(opened.id, 2))
        self.cursors = [e.cursor for e in events]

    def resolve(self, ref: str) -> str:
        return {"<open>": self.open_id, "<ended>": self.ended_id}.get(ref, ref)

    def fresh_handoff(self) -> str:
        handoff = self.svc.run(self.svc.harness.start_handoff(f"rpc-fuzz-{next(self.serial)}"))
        return handoff.id

    def known(self, handoff_id: str) -> bool:
        return self.svc.run(self.svc.harness.running.store.get_handoff(handoff_id)) is not None

    def call(self, rpc: str, request: Any, verdict: Verdict, errors_seen: Callable[[], str]) -> Any:
        """Makes the call; checks its status against the verdict and the logs."""
        stub = self.svc.harness.stub
        errors_seen()  # forget what an earlier (failed) example left
        self.calls += 1
        response: Any = None
        try:
            if rpc == "StreamAgentReplies":
                response = self.svc.call(lambda: first_item(stub.StreamAgentReplies(request)))
            else:
                response = self.svc.call(lambda: getattr(stub, rpc)(request))
            code, details = "OK", ""
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code().name, exc.details() or ""
        self.codes[code] += 1
        problems = errors_seen()
        if code == "RESOURCE_EXHAUSTED" and request.ByteSize() > GRPC_MAX_RECEIVE:
            return None  # gRPC's own limit on a request's size
        assert code not in ("INTERNAL", "UNKNOWN"), f"{rpc} answered {code}: {details}; {problems}"
        assert code in verdict.codes, f"{rpc} answered {code} ({details!r}), expected {verdict}"
        if code == "INVALID_ARGUMENT" and verdict.fields:
            assert details.startswith(verdict.fields), (
                f"{rpc}: INVALID_ARGUMENT {details!r} does not start with one of {verdict.fields}"
            )
        assert not problems, f"error log records: {problems}"
        return response


async def first_item(call: Any) -> pb.StreamAgentRepliesResponse | None:
    """The stream's first item (an event or a heartbeat): proof that it opened. None when
    it completed without one."""
    try:
        item = await call.read()
    finally:
        call.cancel()
    return None if item is grpc.aio.EOF else item


def rpc_checks(run: RpcRun) -> dict[str, tuple[st.SearchStrategy[Any], Callable[[Any], None]]]:
    """For each RPC: the strategy of its requests and the check of one request."""

    def start(req: pb.StartHandoffRequest) -> None:
        response = run.call("StartHandoff", req, start_verdict(req), run.errors_seen)
        if response is not None:
            assert response.handoff.conversation_id == req.conversation_id
            if response.created:
                assert dict(response.handoff.metadata) == dict(req.metadata)

    def send(args: tuple[str, str, str, list[pb.Attachment]]) -> None:
        ref, client_message_id, text, attachments = args
        req = pb.SendMessageRequest(
            handoff_id=run.resolve(ref),
            client_message_id=client_message_id,
            text=text,
            attachments=attachments,
        )
        violations = send_violations(req)
        if violations:
            verdict = Verdict.of("INVALID_ARGUMENT", fields=tuple(violations))
        elif ref == "<open>":
            verdict = Verdict.of("OK")
        elif ref == "<ended>":
            verdict = Verdict.of("FAILED_PRECONDITION")
        else:
            verdict = (
                Verdict.of("OK", "FAILED_PRECONDITION")
                if run.known(ref)
                else Verdict.of("NOT_FOUND")
            )
        run.call("SendMessage", req, verdict, run.errors_seen)

    def stop(args: tuple[str, str]) -> None:
        ref, notice = args
        handoff_id = run.fresh_handoff() if ref == "<open>" else run.resolve(ref)
        req = pb.StopHandoffRequest(handoff_id=handoff_id, notice=notice)
        fields = [f for f, bad in (("handoff_id", bad_id(handoff_id)),) if bad]
        if len(notice) > MAX_TEXT_CHARS:
            fields.append("notice")
        if fields:
            verdict = Verdict.of("INVALID_ARGUMENT", fields=tuple(fields))
        else:
            verdict = Verdict.of("OK" if run.known(handoff_id) else "NOT_FOUND")
        response = run.call("StopHandoff", req, verdict, run.errors_seen)
        if response is not None:
            assert response.handoff.state == pb.HANDOFF_STATE_ENDED

    def get(ref: str) -> None:
        handoff_id = run.resolve(ref)
        req = pb.GetHandoffRequest(handoff_id=handoff_id)
        if bad_id(handoff_id):
            verdict = Verdict.of("INVALID_ARGUMENT", fields=("handoff_id",))
        else:
            verdict = Verdict.of("OK" if run.known(handoff_id) else "NOT_FOUND")
        response = run.call("GetHandoff", req, verdict, run.errors_seen)
        if response is not None:
            assert response.handoff.id == handoff_id

    def stream(args: tuple[str, str]) -> None:
        ref, cursor = args
        handoff_id = "" if ref == "<all>" else run.resolve(ref)
        if cursor.startswith("<cursor "):
            cursor = run.cursors[int(cursor[8:-1]) % len(run.cursors)]
        req = pb.StreamAgentRepliesRequest(handoff_id=handoff_id, after_cursor=cursor)
        newest = run.svc.run(run.svc.harness.running.store.last_seq())
        odd_id = bool(handoff_id) and bad_id(handoff_id)  # blank or too long: either answer
        if cursor and not CURSOR.fullmatch(cursor):
            fields = ("after_cursor", "handoff_id") if odd_id else ("after_cursor",)
            verdict = Verdict.of("INVALID_ARGUMENT", fields=fields)
        elif odd_id:
            verdict = Verdict.of("NOT_FOUND", "INVALID_ARGUMENT", fields=("handoff_id",))
        elif handoff_id and not run.known(handoff_id):
            verdict = Verdict.of("NOT_FOUND")
        elif cursor and int(cursor[3:]) > newest:
            verdict = Verdict.of("OUT_OF_RANGE")
        else:
            verdict = Verdict.of("OK")
        item = run.call("StreamAgentReplies", req, verdict, run.errors_seen)
        if verdict.codes == {"OK"} and item is not None and item.WhichOneof("item") == "event":
            assert not handoff_id or item.event.handoff_id == handoff_id

    cursors = st.one_of(
        st.just(""),
        st.integers(0, 10).map(lambda i: f"<cursor {i}>"),
        st.integers(0, 10**18 - 1).map(encode_cursor),
        st.sampled_from(["c1.0", "c1.1", "c1.00001", "c1." + "9" * 19, "c1.", "c1.-1", "c1.+1"]),
        st.sampled_from([" c1.1", "c1.1 ", "C1.1", "c2.1", "c1.\u0661", "c1.1.1", "c1.0x1"]),
        rpc_text(),
    )
    return {
        "StartHandoff": (start_requests, start),
        "SendMessage": (
            st.tuples(
                # Mostly the open handoff and a usable key: the call then reaches Brevo.
                st.one_of(st.just("<open>"), st.just("<open>"), st.just("<ended>"), rpc_text()),
                st.uuids().map(str) | rpc_text(),
                st.text(rpc_char, min_size=1, max_size=200) | rpc_text(),
                attachment_lists,
            ),
            send,
        ),
        "StopHandoff": (st.tuples(handoff_refs, rpc_text()), stop),
        "GetHandoff": (handoff_refs, get),
        "StreamAgentReplies": (
            st.tuples(st.just("<all>") | handoff_refs, cursors),
            stream,
        ),
    }


RPC_EXAMPLES = {
    "StartHandoff": 300,
    "SendMessage": 300,
    "StopHandoff": 250,
    "GetHandoff": 250,
    "StreamAgentReplies": 300,
}


@pytest.mark.parametrize("rpc", list(RPC_EXAMPLES))
def test_rpc_fuzz(
    rpc: str,
    service: ServiceThread,
    request: pytest.FixtureRequest,
    record_property: Callable[[str, object], None],
) -> None:
    """Every request gets a status documented for it (README "The contract"; never INTERNAL
    or UNKNOWN), INVALID_ARGUMENT naming the field; no error in the logs; the service still
    serves a normal handoff afterwards."""
    run = RpcRun(service)
    run.prepare()
    strategy, check = rpc_checks(run)[rpc]
    started = time.monotonic()
    with watch_error_logs() as watch:
        mark = [0]

        def errors_seen() -> str:
            found = watch.describe(mark[0])
            mark[0] = len(watch.records)
            return found

        run.errors_seen = errors_seen

        @settings(FUZZ, max_examples=RPC_EXAMPLES[rpc])
        @given(args=strategy)
        def rpc_answers_as_documented(args: Any) -> None:
            check(args)

        try:
            rpc_answers_as_documented()
            served_normally(service, rpc)
            assert not watch.records, watch.describe()
        finally:
            record_figures(
                request,
                record_property,
                {
                    "rpc": rpc,
                    "calls": run.calls,
                    "codes": dict(sorted(run.codes.items())),
                    "error_log_records": len(watch.records),
                    "duration_s": round(time.monotonic() - started, 2),
                },
            )
    assert run.calls >= RPC_EXAMPLES[rpc]
