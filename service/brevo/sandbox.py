"""A local stand-in for Brevo Conversations, for ``make run`` without an API key, demos and tests.

What it imitates (same paths, bodies and error shapes as Brevo, see the shared reference):

- REST under ``/v3``: ``GET /v3/account``, ``POST /v3/conversations/messages`` (with Brevo's
  body validation), ``GET /v3/conversations/messages/{id}``. A missing or wrong ``api-key``
  header gets Brevo's 401 ``{"code": "unauthorized", "message": "Key not found"}``.
- Webhooks: ``conversationStarted`` when a chat opens, one ``conversationFragment`` per new
  message (the echo of a message posted through the API included), and
  ``conversationTranscript`` with the whole chat when the agent closes it. They are POSTed to
  the webhook URL one at a time, in the order they were produced, after the REST answer that
  caused them; a delivery is retried a few times on connection errors and 5xx.

What it adds (Brevo has none of this):

- a simulated agent, Sam (``SANDBOX_AGENT``), who greets each new chat, acknowledges every
  relayed user message (text starting with ``user_prefix``) and closes the chat when the user
  says "bye";
- control routes under ``/_sandbox`` (and the same operations as methods) to make a human
  agent write, send a file, close a chat or go offline;
- fault injection (``inject_faults``): the next REST calls answer a chosen status, headers,
  body or delay instead of the real answer;
- ``rest_calls``, ``messages()`` and ``wait_idle()`` for tests.

Everything lives in memory; ids are random, conversation ids are stable per visitor.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import hmac
import json
import logging
import mimetypes
import re
import secrets
import string
import time
from collections import deque
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import quote

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = [
    "GOODBYE_TEXT",
    "GREETING_TEXT",
    "SANDBOX_ACCOUNT",
    "SANDBOX_AGENT",
    "BrevoSandbox",
    "Fault",
    "noted_text",
]

log = logging.getLogger("service.brevo.sandbox")

SANDBOX_AGENT: Final[dict[str, str]] = {
    "id": "SandboxAgentSam01",
    "name": "Sam",
    "email": "sam@sandbox.invalid",
    "userpic": "https://sandbox.invalid/sam.png",
}

SANDBOX_ACCOUNT: Final[dict[str, object]] = {
    "email": "sandbox@brevo-sandbox.invalid",
    "companyName": "Brevo sandbox",
    "plan": [{"type": "free"}],
}

GREETING_TEXT: Final = (
    "Hi, I'm Sam from the support team. I have read the conversation so far - how can I help?"
)
GOODBYE_TEXT: Final = "Glad I could help. I am closing this chat now."


def noted_text(user_text: str) -> str:
    """Sam's answer to a relayed user message (the text without the user prefix)."""
    return f'Thanks, noted: "{user_text}"'


_ID_ALPHABET: Final = string.ascii_letters + string.digits
_ID_LENGTH: Final = 17
_DELIVERY_RETRIES: Final = 3
_DELIVERY_RETRY_PAUSE_S: Final = 0.2
_DELIVERY_TIMEOUT_S: Final = 10.0
# Deliveries wait until the REST answer that caused them went out; this bounds that wait
# in case the answer never does (the caller hung up).
_ANSWER_SENT_WAIT_S: Final = 2.0
_MESSAGE_PATH: Final = re.compile(r"conversations/messages/([^/]+)")
_V3_METHODS: Final = ["GET", "POST", "PUT", "DELETE", "PATCH"]

AgentEntry = dict[str, str | None]
Message = dict[str, object]


@dataclass(frozen=True)
class Fault:
    """An answer to give instead of the real one, for the next REST call."""

    status: int = 500  # HTTP status to answer instead of the real answer
    headers: Mapping[str, str] = field(default_factory=dict)  # e.g. x-sib-ratelimit-reset
    body: Mapping[str, str] | None = None  # default: {"code": ..., "message": ...} fitting status
    delay_s: float = 0.0  # sleep before answering (to provoke client timeouts)


_FAULT_BODIES: Final[dict[int, tuple[str, str]]] = {
    400: ("bad_request", "Bad request"),
    401: ("unauthorized", "Key not found"),
    403: ("permission_denied", "Permission denied"),
    404: ("document_not_found", "Document not found"),
    429: ("too_many_requests", "Too many requests"),
    500: ("internal_error", "Internal server error"),
    502: ("bad_gateway", "Bad gateway"),
    503: ("service_unavailable", "Service temporarily unavailable"),
    504: ("gateway_timeout", "Gateway timeout"),
}


def _fault_body(status: int) -> dict[str, str]:
    code, message = _FAULT_BODIES.get(
        status,
        ("internal_error", "Internal server error") if status >= 500 else ("bad_request", "Error"),
    )
    return {"code": code, "message": message}


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status)


def _now_ms() -> int:
    return int(time.time() * 1000)


def _random_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(_ID_LENGTH))


def _stable_id(kind: str, value: str) -> str:
    """A 17-char [A-Za-z0-9] id that is always the same for the same (kind, value)."""
    number = int.from_bytes(hashlib.sha256(f"{kind}:{value}".encode()).digest(), "big")
    chars = []
    for _ in range(_ID_LENGTH):
        number, index = divmod(number, len(_ID_ALPHABET))
        chars.append(_ID_ALPHABET[index])
    return "".join(chars)


def _as_int(value: object, default: int) -> int:
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    return default


def _agent_entry(agent: Mapping[str, str]) -> AgentEntry:
    """An ``agents[]`` item ({id, name, email, userpic}) from a partial mapping."""
    email = agent.get("email") or ""
    name = agent.get("name") or "Agent"
    agent_id = agent.get("id") or _stable_id("agent", (email or name).lower())
    return {"id": agent_id, "name": name, "email": email, "userpic": agent.get("userpic") or None}


def _agent_message(entry: AgentEntry, text: str) -> Message:
    """A new agent message as Brevo stores it (webhook spelling)."""
    return {
        "id": _random_id(),
        "type": "agent",
        "text": text,
        "html": text,
        "createdAt": _now_ms(),
        "agentId": entry["id"],
        "agentName": entry["name"],
        "agentUserpic": entry["userpic"],
    }


@dataclass
class _Visitor:
    """A visitor's thread; a chat is the part of it since it was last opened."""

    id: str
    number: int
    thread: list[Message] = field(default_factory=list)
    chat_open: bool = False
    chat_start: int = 0  # index in ``thread`` of the open (or last) chat's first message
    chat_number: int = 0
    greeted: bool = False
    api_messages_in_chat: int = 0

    @property
    def conversation_id(self) -> str:
        return _stable_id("conversation", self.id)

    @property
    def thread_id(self) -> str:
        return _stable_id("thread", self.id)

    def chat_messages(self) -> list[Message]:
        return self.thread[self.chat_start :]


@dataclass
class _Delivery:
    body: dict[str, object]
    answer_sent: asyncio.Event | None  # set once the REST answer that caused it went out


@dataclass
class _RestCall:
    method: str
    path: str
    status: int | None = None


class BrevoSandbox:
    """Imitates Brevo Conversations (REST + webhooks) in memory, plus a simulated agent.

    ``service_agent`` describes the Brevo agent the service posts as ({id, name, email,
    userpic}); messages posted with its id (or e-mail) carry its name, like in Brevo where
    the agent profile exists beforehand. Unknown agent ids are accepted and named from the
    request; ``agentEmail`` + ``agentName`` get a stable id derived from the e-mail.
    """

    def __init__(
        self,
        *,
        api_key: str,
        webhook_url: str | None = None,
        auto_agent: bool = True,
        agent_reply_delay_s: float = 0.3,
        agent_online: bool = True,
        user_prefix: str = "Botpress User: ",
        service_agent: Mapping[str, str] | None = None,
    ) -> None:
        self._api_key = api_key
        self._webhook_url = webhook_url
        self._auto_agent = auto_agent
        self._reply_delay_s = agent_reply_delay_s
        self._online = agent_online
        self._user_prefix = user_prefix
        self._agents: dict[str, AgentEntry] = {}
        self._remember_agent(_agent_entry(SANDBOX_AGENT))
        if service_agent is not None:
            self._remember_agent(_agent_entry(service_agent))
        self._visitors: dict[str, _Visitor] = {}
        self._messages_by_id: dict[str, tuple[str, Message]] = {}
        self._faults: deque[Fault] = deque()
        self._calls: list[_RestCall] = []
        self._queue: asyncio.Queue[_Delivery] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._http: httpx.AsyncClient | None = None
        self._closed = False
        self._app = Starlette(
            routes=[
                Route("/v3/{path:path}", self._v3, methods=_V3_METHODS),
                Route("/_sandbox/agent/messages", self._control_agent_message, methods=["POST"]),
                Route("/_sandbox/agent/close", self._control_close, methods=["POST"]),
                Route("/_sandbox/agent/online", self._control_online, methods=["POST"]),
                Route("/_sandbox/messages", self._control_messages, methods=["GET"]),
            ]
        )

    # --- public API -----------------------------------------------------------------------

    @property
    def app(self) -> Starlette:
        """The ASGI app: Brevo's REST API under /v3, control routes under /_sandbox."""
        return self._app

    def set_webhook_url(self, url: str) -> None:
        """Where webhooks go from now on (read at delivery time)."""
        self._webhook_url = url

    def inject_faults(self, *faults: Fault) -> None:
        """The next REST calls (any /v3 endpoint) answer these, one per call, in order."""
        self._faults.extend(faults)

    def set_agent_online(self, online: bool) -> None:
        """Offline: events say ``isNoAvailableAgent: true`` and Sam does not answer.

        Coming back online, Sam greets the open chats he has not greeted yet.
        """
        self._online = online
        if online and self._auto_agent:
            for visitor in self._visitors.values():
                if visitor.chat_open and not visitor.greeted and visitor.api_messages_in_chat:
                    visitor.greeted = True
                    self._schedule_reply(visitor, GREETING_TEXT, close=False, answer_sent=None)

    def messages(self, visitor_id: str) -> list[dict[str, object]]:
        """The visitor's whole thread, as Brevo message dicts (webhook spelling), in order."""
        visitor = self._visitors.get(visitor_id)
        return copy.deepcopy(visitor.thread) if visitor is not None else []

    @property
    def rest_calls(self) -> list[tuple[str, str, int]]:
        """(method, path, status answered) of every answered /v3 call, in order of arrival."""
        return [(c.method, c.path, c.status) for c in self._calls if c.status is not None]

    @property
    def calls_in_progress(self) -> list[tuple[str, str]]:
        """(method, path) of the /v3 calls received and not answered yet."""
        return [(c.method, c.path) for c in self._calls if c.status is None]

    async def agent_says(
        self,
        visitor_id: str,
        text: str,
        *,
        agent: Mapping[str, str] | None = None,
        file: Mapping[str, object] | None = None,
    ) -> dict[str, object]:
        """A human agent (Sam by default) writes to the visitor; delivers a fragment.

        ``file`` takes the newer webhook spelling, partly ({name, size, mimeType, link,
        isImage, imageInfo: {width, height, previewLink}}); missing fields get defaults.
        Returns the message as Brevo stores it.
        """
        entry = _agent_entry(agent if agent is not None else SANDBOX_AGENT)
        self._remember_agent(entry)
        message = _agent_message(entry, text)
        if file is not None:
            message["file"] = self._file_object(str(message["id"]), text, file)
        self._add_message(self._visitor(visitor_id), message, entry, answer_sent=None)
        return copy.deepcopy(message)

    async def close_conversation(self, visitor_id: str) -> None:
        """The agent closes the chat: delivers ``conversationTranscript`` with all of it.

        Raises LookupError when the visitor has no open chat.
        """
        visitor = self._visitors.get(visitor_id)
        if visitor is None or not visitor.chat_open:
            raise LookupError(f"visitor {visitor_id!r} has no open conversation")
        chat = visitor.chat_messages()
        writers: list[str] = []
        for message in chat:
            agent_id = message.get("agentId")
            if isinstance(agent_id, str) and agent_id not in writers:
                writers.append(agent_id)
        visitor_object = self._visitor_object(visitor)
        visitor_object["isBanned"] = False
        self._enqueue(
            {
                "eventName": "conversationTranscript",
                "conversationId": visitor.conversation_id,
                "missedMessagesCount": 0,
                "messages": copy.deepcopy(chat),
                "agents": [dict(self._agents[a]) for a in writers if a in self._agents],
                "visitor": visitor_object,
                "conversationStartPage": {"link": "", "title": ""},
            },
            answer_sent=None,
        )
        visitor.chat_open = False
        visitor.chat_start = len(visitor.thread)

    async def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Returns once every scheduled webhook delivery and simulated reply is done."""

        async def settle() -> None:
            while True:
                pending = [t for t in self._tasks if not t.done()]
                if pending:
                    await asyncio.wait(pending)
                    continue
                await self._queue.join()
                if not any(not t.done() for t in self._tasks) and self._queue.empty():
                    return

        try:
            async with asyncio.timeout(timeout_s):
                await settle()
        except TimeoutError:
            raise TimeoutError(
                f"the Brevo sandbox still had deliveries or replies pending after {timeout_s} s"
            ) from None

    async def aclose(self) -> None:
        """Stops the delivery worker and pending replies (undelivered events are dropped)."""
        self._closed = True
        tasks = [*self._tasks, *([self._worker] if self._worker is not None else [])]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._tasks.clear()
        self._worker = None
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    # --- REST (/v3) -----------------------------------------------------------------------

    async def _v3(self, request: Request) -> Response:
        """Every /v3 call: recorded, then a fault if one is queued, then the key, then Brevo."""
        call = _RestCall(request.method, request.url.path)
        self._calls.append(call)
        response = await self._v3_answer(request)
        call.status = response.status_code
        return response

    async def _v3_answer(self, request: Request) -> Response:
        if self._faults:
            fault = self._faults.popleft()
            if fault.delay_s > 0:
                await asyncio.sleep(fault.delay_s)
            body = dict(fault.body) if fault.body is not None else _fault_body(fault.status)
            return JSONResponse(body, status_code=fault.status, headers=dict(fault.headers))
        given_key = request.headers.get("api-key", "")
        if not hmac.compare_digest(given_key.encode(), self._api_key.encode()):
            return _error(401, "unauthorized", "Key not found")
        path = request.path_params["path"]
        method = request.method
        if path == "account":
            if method not in ("GET", "HEAD"):
                return _error(405, "method_not_allowed", "Method not allowed")
            return JSONResponse(SANDBOX_ACCOUNT)
        if path == "conversations/messages":
            if method != "POST":
                return _error(405, "method_not_allowed", "Method not allowed")
            return await self._post_message(request)
        match = _MESSAGE_PATH.fullmatch(path)
        if match is not None and method in ("GET", "HEAD"):
            found = self._messages_by_id.get(match.group(1))
            if found is None:
                return _error(404, "document_not_found", "Message not found")
            visitor_id, message = found
            return JSONResponse(self._rest_view(visitor_id, message))
        return _error(404, "not_found", f"The Brevo sandbox does not implement {method} /v3/{path}")

    async def _post_message(self, request: Request) -> Response:
        try:
            body: object = json.loads(await request.body())
        except ValueError:
            return _error(400, "bad_request", "Malformed JSON in the request body")
        if not isinstance(body, dict):
            return _error(400, "bad_request", "The request body must be a JSON object")
        problem = self._validate_message(body)
        if problem is not None:
            return _error(400, *problem)
        visitor_id = str(body["visitorId"])
        text = str(body["text"])
        received_from = body.get("receivedFrom")
        entry = self._api_agent(body)
        message = _agent_message(entry, text)
        if isinstance(received_from, str) and received_from:
            message["receivedFrom"] = received_from
        visitor = self._visitor(visitor_id)
        answer_sent = asyncio.Event()
        self._add_message(visitor, message, entry, answer_sent=answer_sent)
        visitor.api_messages_in_chat += 1
        self._simulate_agent(visitor, text, answer_sent)

        async def mark_answer_sent() -> None:  # async: Starlette runs sync tasks in a thread
            answer_sent.set()

        return JSONResponse(
            self._rest_view(visitor_id, message), background=BackgroundTask(mark_answer_sent)
        )

    @staticmethod
    def _validate_message(body: Mapping[object, object]) -> tuple[str, str] | None:
        """Brevo's rules: visitorId and text, and agentId or agentEmail+agentName+receivedFrom."""

        def check(name: str) -> tuple[str, str] | None:
            value = body.get(name)
            if value is None or value == "":
                return ("missing_parameter", f"{name} is missing")
            if not isinstance(value, str):
                return ("invalid_parameter", f"{name} must be a string")
            return None

        for name in ("visitorId", "text"):
            problem = check(name)
            if problem is not None:
                return problem
        if body.get("agentId") not in (None, ""):
            if not isinstance(body.get("agentId"), str):
                return ("invalid_parameter", "agentId must be a string")
            received_from = body.get("receivedFrom")
            if received_from is not None and not isinstance(received_from, str):
                return ("invalid_parameter", "receivedFrom must be a string")
            return None
        if body.get("agentEmail") in (None, "") and body.get("agentName") in (None, ""):
            return ("missing_parameter", "agentId is missing (or agentEmail and agentName)")
        for name in ("agentEmail", "agentName", "receivedFrom"):
            problem = check(name)
            if problem is not None:
                return problem
        return None

    def _api_agent(self, body: Mapping[object, object]) -> AgentEntry:
        """The agent a validated API body names, from the directory or made up from it."""
        agent_id = body.get("agentId")
        name = body.get("agentName")
        email = body.get("agentEmail")
        if isinstance(agent_id, str) and agent_id:
            known = self._agents.get(agent_id)
            if known is not None:
                return known
            entry: AgentEntry = {
                "id": agent_id,
                "name": name if isinstance(name, str) and name else "API agent",
                "email": email if isinstance(email, str) else "",
                "userpic": None,
            }
        else:
            email_text = str(email)
            for known in self._agents.values():
                if (known["email"] or "").lower() == email_text.lower():
                    return known
            entry = {
                "id": _stable_id("agent", email_text.lower()),
                "name": str(name),
                "email": email_text,
                "userpic": None,
            }
        self._remember_agent(entry)
        return entry

    @staticmethod
    def _rest_view(visitor_id: str, message: Message) -> dict[str, object]:
        """A message as REST answers spell it (with visitorId, without html/agentUserpic)."""
        view: dict[str, object] = {
            "id": message["id"],
            "type": message["type"],
            "text": message["text"],
            "visitorId": visitor_id,
        }
        for key, value in message.items():
            if key not in view and key not in ("html", "agentUserpic"):
                view[key] = copy.deepcopy(value)
        return view

    # --- threads and events ---------------------------------------------------------------

    def _remember_agent(self, entry: AgentEntry) -> None:
        agent_id = entry["id"]
        if agent_id:
            self._agents[agent_id] = entry

    def _visitor(self, visitor_id: str) -> _Visitor:
        visitor = self._visitors.get(visitor_id)
        if visitor is None:
            visitor = _Visitor(id=visitor_id, number=len(self._visitors) + 1)
            self._visitors[visitor_id] = visitor
        return visitor

    def _visitor_object(self, visitor: _Visitor) -> dict[str, object]:
        """The ``visitor`` of webhook bodies, shaped like Brevo's for an API-started chat."""
        colour = _stable_id("colour", visitor.id).encode().hex()[:6]
        return {
            "id": visitor.id,
            "threadId": visitor.thread_id,
            "threadLink": f"https://sandbox.invalid/chat/{visitor.thread_id}",
            "source": "api",
            "sourceChannelRef": None,
            "sourceChannelLink": None,
            "sourceConversationRef": None,
            "groupId": None,
            "color": f"#{colour}",
            "ip": None,
            "browserLanguage": "en-GB",
            "conversationLanguage": "en",
            "browser": "",
            "os": "",
            "userAgent": "",
            "country": "",
            "city": "",
            "lastVisit": None,
            "displayedName": f"Visitor #{visitor.number}",
            "contactAttributes": None,
            "integrationAttributes": None,
            "attributes": {},
            "formattedAttributes": None,
            "notes": None,
            "contactId": None,
            "marketingConsent": False,
            "termsOfServiceConsent": False,
        }

    def _add_message(
        self,
        visitor: _Visitor,
        message: Message,
        writer: AgentEntry,
        *,
        answer_sent: asyncio.Event | None,
    ) -> bool:
        """Stores a message and queues its events; returns whether it opened a chat."""
        opened = not visitor.chat_open
        if opened:
            visitor.chat_open = True
            visitor.chat_start = len(visitor.thread)
            visitor.chat_number += 1
            visitor.greeted = False
            visitor.api_messages_in_chat = 0
        visitor.thread.append(message)
        self._messages_by_id[str(message["id"])] = (visitor.id, message)
        if opened:
            self._enqueue(
                {
                    "eventName": "conversationStarted",
                    "conversationId": visitor.conversation_id,
                    "conversationStartPage": {"link": "", "title": ""},
                    "isNoAvailableAgent": not self._online,
                    "message": copy.deepcopy(message),
                    "visitor": self._visitor_object(visitor),
                },
                answer_sent=answer_sent,
            )
        self._enqueue(
            {
                "eventName": "conversationFragment",
                "conversationId": visitor.conversation_id,
                "isNoAvailableAgent": not self._online,
                "messages": [copy.deepcopy(message)],
                "agents": [dict(writer)],
                "visitor": self._visitor_object(visitor),
            },
            answer_sent=answer_sent,
        )
        return opened

    @staticmethod
    def _file_object(message_id: str, text: str, file: Mapping[str, object]) -> dict[str, object]:
        """A ``file`` in the newer webhook spelling, defaults filled in."""
        name = str(file.get("name") or text or "file")
        mime_type = str(
            file.get("mimeType") or mimetypes.guess_type(name)[0] or "application/octet-stream"
        )
        given_is_image = file.get("isImage")
        is_image = (
            given_is_image if isinstance(given_is_image, bool) else mime_type.startswith("image/")
        )
        link = str(file.get("link") or f"https://sandbox.invalid/files/{message_id}/{quote(name)}")
        result: dict[str, object] = {
            "name": name,
            "size": _as_int(file.get("size"), 0),
            "mimeType": mime_type,
            "isAllowedFileType": True,
            "isImage": is_image,
            "isSticker": False,
            "link": link,
        }
        if is_image:
            info = file.get("imageInfo")
            info_map: Mapping[object, object] = info if isinstance(info, Mapping) else {}
            preview = info_map.get("previewLink") or info_map.get("previewUrl") or link
            result["imageInfo"] = {
                "width": _as_int(info_map.get("width"), 0),
                "height": _as_int(info_map.get("height"), 0),
                "previewLink": str(preview),
            }
        return result

    # --- simulated agent ------------------------------------------------------------------

    def _simulate_agent(self, visitor: _Visitor, text: str, answer_sent: asyncio.Event) -> None:
        """Sam's reaction to a message posted through the API (nothing when offline)."""
        if not (self._auto_agent and self._online):
            return
        if not visitor.greeted:  # the chat's opening message, or Sam just came online
            visitor.greeted = True
            self._schedule_reply(visitor, GREETING_TEXT, close=False, answer_sent=answer_sent)
            return
        if not text.startswith(self._user_prefix):
            return  # closing notices and other service messages get no answer
        user_text = text[len(self._user_prefix) :]
        if "bye" in user_text.lower():
            self._schedule_reply(visitor, GOODBYE_TEXT, close=True, answer_sent=answer_sent)
        else:
            self._schedule_reply(
                visitor, noted_text(user_text), close=False, answer_sent=answer_sent
            )

    def _schedule_reply(
        self, visitor: _Visitor, text: str, *, close: bool, answer_sent: asyncio.Event | None
    ) -> None:
        chat_number = visitor.chat_number

        async def reply() -> None:
            await self._wait_answer_sent(answer_sent)
            await asyncio.sleep(self._reply_delay_s)
            if not self._online or not visitor.chat_open or visitor.chat_number != chat_number:
                return  # the agent left, or the chat was closed meanwhile
            await self.agent_says(visitor.id, text)
            if close:
                await self.close_conversation(visitor.id)

        self._spawn(reply())

    def _spawn(self, work: Awaitable[None]) -> None:
        async def guarded() -> None:
            try:
                await work
            except Exception as exc:  # a simulated reply must not die silently
                log.warning("sandbox agent reply failed: %s", type(exc).__name__)

        task = asyncio.get_running_loop().create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- webhook delivery -----------------------------------------------------------------

    def _enqueue(self, body: dict[str, object], *, answer_sent: asyncio.Event | None) -> None:
        if self._closed:
            return
        self._queue.put_nowait(_Delivery(body=body, answer_sent=answer_sent))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._deliver_forever())

    @staticmethod
    async def _wait_answer_sent(answer_sent: asyncio.Event | None) -> None:
        if answer_sent is None:
            return
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_ANSWER_SENT_WAIT_S):
                await answer_sent.wait()

    async def _deliver_forever(self) -> None:
        """The single worker: deliveries go out one at a time, in the order produced."""
        while True:
            delivery = await self._queue.get()
            try:
                await self._wait_answer_sent(delivery.answer_sent)
                await self._deliver(delivery.body)
            except Exception as exc:
                log.warning("webhook delivery failed: %s", type(exc).__name__)
            finally:
                self._queue.task_done()

    async def _deliver(self, body: dict[str, object]) -> None:
        url = self._webhook_url
        if not url:
            return  # no webhook configured: Brevo drops the event too
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=httpx.Timeout(_DELIVERY_TIMEOUT_S))
        attempts = 1 + _DELIVERY_RETRIES
        attempt = 0
        problem = ""
        while attempt < attempts:
            attempt += 1
            try:
                response = await self._http.post(url, json=body)
            except httpx.TransportError as exc:
                problem = type(exc).__name__  # never the URL: it holds a secret token
                retryable = True
            else:
                if 200 <= response.status_code < 300:
                    return
                problem = f"HTTP {response.status_code}"
                retryable = response.status_code >= 500
            if not retryable or attempt == attempts:
                break
            await asyncio.sleep(_DELIVERY_RETRY_PAUSE_S)
        log.warning(
            "webhook delivery failed: %s (%s event, %d attempt%s)",
            problem,
            body.get("eventName"),
            attempt,
            "" if attempt == 1 else "s",
        )

    # --- control routes (/_sandbox) -------------------------------------------------------

    @staticmethod
    async def _json_object(request: Request) -> dict[str, object] | None:
        try:
            body: object = json.loads(await request.body())
        except ValueError:
            return None
        return {str(k): v for k, v in body.items()} if isinstance(body, dict) else None

    async def _control_agent_message(self, request: Request) -> Response:
        body = await self._json_object(request)
        if body is None:
            return _error(400, "bad_request", "Send a JSON object: {visitorId, text}")
        visitor_id, text, file = body.get("visitorId"), body.get("text"), body.get("file")
        if not isinstance(visitor_id, str) or not visitor_id:
            return _error(400, "missing_parameter", "visitorId is missing")
        if not isinstance(text, str) or not text:
            return _error(400, "missing_parameter", "text is missing")
        if file is not None and not isinstance(file, dict):
            return _error(400, "invalid_parameter", "file must be an object")
        file_map = {str(k): v for k, v in file.items()} if isinstance(file, dict) else None
        message = await self.agent_says(visitor_id, text, file=file_map)
        return JSONResponse(message)

    async def _control_close(self, request: Request) -> Response:
        body = await self._json_object(request)
        visitor_id = body.get("visitorId") if body is not None else None
        if not isinstance(visitor_id, str) or not visitor_id:
            return _error(400, "missing_parameter", "visitorId is missing")
        try:
            await self.close_conversation(visitor_id)
        except LookupError:
            return _error(404, "document_not_found", "This visitor has no open conversation")
        return JSONResponse({"visitorId": visitor_id, "closed": True})

    async def _control_online(self, request: Request) -> Response:
        body = await self._json_object(request)
        online = body.get("online") if body is not None else None
        if not isinstance(online, bool):
            return _error(400, "invalid_parameter", 'Send {"online": true} or {"online": false}')
        self.set_agent_online(online)
        return JSONResponse({"online": online})

    async def _control_messages(self, request: Request) -> Response:
        visitor_id = request.query_params.get("visitorId", "")
        if not visitor_id:
            return _error(400, "missing_parameter", "visitorId is missing")
        return JSONResponse({"visitorId": visitor_id, "messages": self.messages(visitor_id)})
