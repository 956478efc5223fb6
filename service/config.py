"""Configuration from environment variables, each overridable by a command-line flag.

Every setting is documented in the README's configuration table; ``SETTINGS`` below is
the single list both the parser and that table come from.
"""

from __future__ import annotations

import argparse
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from service.core.access import parse_networks

DEFAULT_BREVO_URL = "https://api.brevo.com/v3"
GRPC_SERVERS = ("grpcio", "grpclib")


class ConfigError(Exception):
    """A setting is missing or invalid; the message names it."""


class Secret:
    """A string that never shows itself in a repr, a log line or an f-string by accident."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and secrets.compare_digest(
            self._value.encode(), other._value.encode()
        )

    def __hash__(self) -> int:
        return hash(("Secret", len(self._value)))


@dataclass(frozen=True)
class Setting:
    env: str
    flag: str
    default: str | None
    help: str


SETTINGS: tuple[Setting, ...] = (
    Setting(
        "BREVO_API_KEY",
        "--brevo-api-key",
        None,
        "Brevo API key (xkeysib-...). Unset: run against the built-in Brevo sandbox.",
    ),
    Setting("BREVO_BASE_URL", "--brevo-base-url", DEFAULT_BREVO_URL, "Brevo REST base URL."),
    Setting(
        "BREVO_AGENT_ID",
        "--brevo-agent-id",
        "",
        "Brevo agent id the service posts as (required with an API key, unless "
        "BREVO_AGENT_EMAIL and BREVO_AGENT_NAME are set).",
    ),
    Setting(
        "BREVO_AGENT_EMAIL",
        "--brevo-agent-email",
        "",
        "Post as this agent email instead of an agent id (with BREVO_AGENT_NAME).",
    ),
    Setting(
        "BREVO_AGENT_NAME", "--brevo-agent-name", "", "Agent name to go with BREVO_AGENT_EMAIL."
    ),
    Setting(
        "BREVO_RECEIVED_FROM",
        "--brevo-received-from",
        "handoff-service",
        "receivedFrom tag sent with every post; also used to recognise echoes.",
    ),
    Setting("BREVO_TIMEOUT_SECONDS", "--brevo-timeout-seconds", "10", "Timeout of one Brevo call."),
    Setting(
        "BREVO_MAX_ATTEMPTS",
        "--brevo-max-attempts",
        "4",
        "Attempts per Brevo call on 429, 5xx and connection errors.",
    ),
    Setting(
        "WEBHOOK_TOKEN",
        "--webhook-token",
        None,
        "Secret path token of the webhook URL /webhooks/brevo/<token> (required with an "
        "API key; at least 16 characters). Several, comma-separated, are all accepted "
        "(rotation: new,old). The sandbox makes one up when unset.",
    ),
    Setting(
        "WEBHOOK_ALLOWED_CIDRS",
        "--webhook-allowed-cidrs",
        "",
        "Accept webhooks only from these comma-separated ranges (Brevo publishes "
        "1.179.112.0/20,172.246.240.0/20); unset: from anywhere.",
    ),
    Setting(
        "WEBHOOK_TRUSTED_PROXY_HEADER",
        "--webhook-trusted-proxy-header",
        "",
        "Behind a proxy that appends the client's address to this header (e.g. "
        "X-Forwarded-For), judge that address against WEBHOOK_ALLOWED_CIDRS instead of the "
        "proxy's. Only with such a proxy in front: otherwise anyone can forge it.",
    ),
    Setting(
        "GRPC_AUTH_TOKENS",
        "--grpc-auth-tokens",
        None,
        "Bearer tokens gRPC callers must send (authorization: Bearer <token>); several, "
        "comma-separated, are all accepted (rotation). Unset: no authentication, with a "
        "warning at start-up. Health checks never need one.",
    ),
    Setting(
        "GRPC_TLS_CERT",
        "--grpc-tls-cert",
        "",
        "PEM certificate chain file: serve gRPC over TLS (with GRPC_TLS_KEY).",
    ),
    Setting("GRPC_TLS_KEY", "--grpc-tls-key", "", "PEM private key file of GRPC_TLS_CERT."),
    Setting(
        "GRPC_TLS_CLIENT_CA",
        "--grpc-tls-client-ca",
        "",
        "PEM CA bundle file: require client certificates it signed (mutual TLS).",
    ),
    Setting(
        "WEBHOOK_MAX_BYTES",
        "--webhook-max-bytes",
        str(1024 * 1024),
        "Largest webhook body accepted (413 above).",
    ),
    Setting("HANDOFF_HOST", "--host", "0.0.0.0", "Address both servers listen on."),  # noqa: S104
    Setting("HANDOFF_GRPC_PORT", "--grpc-port", "50051", "gRPC port (0 picks a free one)."),
    Setting(
        "HANDOFF_HTTP_PORT", "--http-port", "8080", "Webhook gateway port (0 picks a free one)."
    ),
    Setting(
        "HANDOFF_SQLITE_PATH",
        "--sqlite-path",
        "data/handoff.db",
        "SQLite file of the store. One process at a time (it keeps records in memory; a "
        "second one is refused at start-up): replicas that share their state need "
        "`REDIS_URL`.",
    ),
    Setting(
        "HANDOFF_SQLITE_SYNCHRONOUS",
        "--sqlite-synchronous",
        "NORMAL",
        "SQLite synchronous mode: NORMAL survives a process crash; FULL also a power cut, at "
        "a disk flush per commit.",
    ),
    Setting(
        "REDIS_URL",
        "--redis-url",
        None,
        "Keep state in Redis (redis://[:password@]host:6379/0, rediss:// for TLS) so that "
        "several replicas share it. Unset: SQLite.",
    ),
    Setting(
        "REDIS_KEY_PREFIX",
        "--redis-key-prefix",
        "{handoff}",
        "Prefix of every Redis key; keep the {braces}: Redis Cluster then keeps all keys on "
        "one slot.",
    ),
    Setting(
        "REDIS_RETENTION_SECONDS",
        "--redis-retention-seconds",
        str(7 * 24 * 3600),
        "How long a handoff's record, events and seen/sent message ids stay in Redis after "
        "its last change.",
    ),
    Setting(
        "REDIS_STREAM_MAXLEN",
        "--redis-stream-maxlen",
        "10000",
        "Events kept per handoff stream (XADD MAXLEN ~); older cursors get OUT_OF_RANGE.",
    ),
    Setting(
        "REDIS_ALL_STREAM_MAXLEN",
        "--redis-all-stream-maxlen",
        "100000",
        "Events kept in the stream of all handoffs (XADD MAXLEN ~).",
    ),
    Setting(
        "HANDOFF_USER_PREFIX",
        "--user-prefix",
        "Botpress User: ",
        "Prefix of the end user's messages as the agent sees them.",
    ),
    Setting(
        "HANDOFF_CLOSING_NOTICE",
        "--closing-notice",
        "The bot has ended this conversation; the user is no longer connected.",
        "Posted to the agent by StopHandoff.",
    ),
    Setting(
        "HANDOFF_AGENT_TIMEOUT_SECONDS",
        "--agent-timeout-seconds",
        "0",
        "End a handoff no agent answered within this many seconds (0: never).",
    ),
    Setting(
        "HANDOFF_TIMEOUT_NOTICE",
        "--timeout-notice",
        "No agent answered in time: the user was told and is back with the bot. "
        "Messages written here now will not reach them.",
        "Posted to the agent when a handoff times out.",
    ),
    Setting(
        "HANDOFF_OPENING_MAX_CHARS",
        "--opening-max-chars",
        "4000",
        "Longest single part of the opening message; longer ones are split.",
    ),
    Setting(
        "HANDOFF_HEARTBEAT_SECONDS",
        "--heartbeat-seconds",
        "15",
        "Heartbeat interval on idle reply streams: one within every this many seconds "
        "of idleness (after 7/8 of it at the earliest).",
    ),
    Setting(
        "HANDOFF_REORDER_WINDOW_SECONDS",
        "--reorder-window-seconds",
        "0",
        "Hold each agent message this long before it goes to the streams, so that one Brevo "
        "delivers later but created earlier still goes first (createdAt order across "
        "webhooks). 0: at once, ordered within each webhook only.",
    ),
    Setting(
        "HANDOFF_STREAM_BUFFER",
        "--stream-buffer",
        "1000",
        "Events buffered per stream before a slow reader is cut off (RESOURCE_EXHAUSTED).",
    ),
    Setting(
        "HANDOFF_SHUTDOWN_GRACE_SECONDS",
        "--shutdown-grace-seconds",
        "10",
        "On SIGTERM, how long calls in flight may take to finish before the process exits "
        "(open streams end at once with UNAVAILABLE).",
    ),
    Setting(
        "GRPC_MAX_CONNECTION_AGE_SECONDS",
        "--grpc-max-connection-age-seconds",
        "1800",
        "Close gRPC connections after about this long (gRPC adds up to a tenth of jitter) "
        "so that clients rebalance across replicas; 0: never.",
    ),
    Setting(
        "GRPC_MAX_CONNECTION_AGE_GRACE_SECONDS",
        "--grpc-max-connection-age-grace-seconds",
        "30",
        "How long calls on such a connection may go on; a stream cut then ends UNAVAILABLE "
        "and its client resumes with its cursor.",
    ),
    Setting(
        "GRPC_SERVER",
        "--grpc-server",
        "grpcio",
        "grpcio: grpc.aio, gRPC's own server; grpclib: a server in pure Python that keeps an "
        "idle stream in about 18 KiB rather than 29, for more CPU a unary call.",
    ),
    Setting("HANDOFF_LOG_LEVEL", "--log-level", "INFO", "DEBUG, INFO, WARNING or ERROR."),
    Setting(
        "HANDOFF_LOG_FORMAT",
        "--log-format",
        "json",
        "json: one JSON object per line (with handoff_id); text: for people.",
    ),
    Setting(
        "HANDOFF_LOG_MESSAGE_TEXT",
        "--log-message-text",
        "off",
        "on: DEBUG lines include the text of relayed messages (personal data: debugging only).",
    ),
    Setting(
        "SANDBOX_PORT",
        "--sandbox-port",
        "8090",
        "Port of the built-in Brevo sandbox (only without BREVO_API_KEY; 0 picks one).",
    ),
    Setting(
        "SANDBOX_AGENT",
        "--sandbox-agent",
        "on",
        "on: the sandbox's simulated agent answers every handoff; off: only what you drive.",
    ),
    Setting(
        "SANDBOX_AGENT_DELAY_SECONDS",
        "--sandbox-agent-delay-seconds",
        "1.0",
        "How long the sandbox's simulated agent takes to answer.",
    ),
)


@dataclass(frozen=True)
class Config:
    brevo_api_key: Secret
    brevo_base_url: str
    brevo_agent_id: str
    brevo_agent_email: str
    brevo_agent_name: str
    brevo_received_from: str
    brevo_timeout_s: float
    brevo_max_attempts: int
    webhook_token: Secret
    webhook_tokens: tuple[Secret, ...]
    webhook_allowed_cidrs: tuple[str, ...]
    webhook_trusted_proxy_header: str
    grpc_auth_tokens: tuple[Secret, ...]
    grpc_tls_cert: str
    grpc_tls_key: str
    grpc_tls_client_ca: str
    webhook_max_bytes: int
    host: str
    grpc_port: int
    http_port: int
    sqlite_path: str
    sqlite_synchronous: str
    redis_url: Secret
    redis_key_prefix: str
    redis_retention_s: float
    redis_stream_maxlen: int
    redis_all_stream_maxlen: int
    user_prefix: str
    closing_notice: str
    agent_timeout_s: float
    timeout_notice: str
    opening_max_chars: int
    heartbeat_s: float
    reorder_window_s: float
    stream_buffer: int
    shutdown_grace_s: float
    grpc_max_connection_age_s: float
    grpc_max_connection_age_grace_s: float
    grpc_server: str
    log_level: str
    log_format: str
    log_message_text: bool
    sandbox_port: int
    sandbox_agent: bool
    sandbox_agent_delay_s: float

    @property
    def use_sandbox(self) -> bool:
        return not self.brevo_api_key

    @property
    def secrets(self) -> tuple[str, ...]:
        """Values that must never appear in a log line."""
        found = [
            s.reveal()
            for s in (self.brevo_api_key, *self.webhook_tokens, *self.grpc_auth_tokens)
            if s
        ]
        password = urlsplit(self.redis_url.reveal()).password if self.redis_url else None
        if password:
            found += [password, unquote(password)]
        return tuple(dict.fromkeys(found))


def load_config(argv: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> Config:
    """Reads the environment, then the flags in ``argv`` (flags win). Raises ConfigError."""
    env = os.environ if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="Bot-to-human handoff service (gRPC + Brevo webhook gateway).",
    )
    for s in SETTINGS:
        parser.add_argument(s.flag, dest=s.env, metavar=s.env, help=f"{s.help} [env {s.env}]")
    args = vars(parser.parse_args(list(argv)))
    raw: dict[str, str | None] = {}
    for s in SETTINGS:
        value = args.get(s.env)
        if value is None:
            value = env.get(s.env)
        raw[s.env] = value if value is not None else s.default

    def text(name: str) -> str:
        return raw[name] or ""

    def number(name: str, kind: type[int] | type[float], low: float, high: float) -> float:
        value = text(name)
        try:
            parsed = kind(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r} is not a {kind.__name__}") from None
        if not low <= parsed <= high:
            raise ConfigError(f"{name}={value} is out of range [{low}, {high}]")
        return parsed

    api_key = text("BREVO_API_KEY").strip()
    tokens = [t.strip() for t in text("WEBHOOK_TOKEN").split(",") if t.strip()]
    token = tokens[0] if tokens else ""
    agent_id = text("BREVO_AGENT_ID").strip()
    agent_email = text("BREVO_AGENT_EMAIL").strip()
    agent_name = text("BREVO_AGENT_NAME").strip()
    if api_key:
        if not token:
            raise ConfigError(
                "WEBHOOK_TOKEN is required with BREVO_API_KEY: choose a long random string "
                "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
            )
        if not agent_id and not (agent_email and agent_name):
            raise ConfigError(
                "BREVO_AGENT_ID is required with BREVO_API_KEY (or both BREVO_AGENT_EMAIL "
                "and BREVO_AGENT_NAME): the Brevo agent the service posts as"
            )
    elif not token:
        token = secrets.token_urlsafe(24)
        tokens = [token]
    for each in tokens:
        if len(each) < 16:
            raise ConfigError(
                "each WEBHOOK_TOKEN must be at least 16 characters: it is the only secret "
                "protecting the webhook URL"
            )
        if not each.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(
                "WEBHOOK_TOKEN may hold only letters, digits, '-' and '_' (it is part of a "
                "URL path), several separated by commas"
            )
    grpc_tokens = [t.strip() for t in text("GRPC_AUTH_TOKENS").split(",") if t.strip()]
    for each in grpc_tokens:
        if len(each) < 16 or any(ch.isspace() for ch in each):
            raise ConfigError(
                "each GRPC_AUTH_TOKENS entry must be at least 16 characters without spaces "
                "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
            )
    cidrs = tuple(c.strip() for c in text("WEBHOOK_ALLOWED_CIDRS").split(",") if c.strip())
    try:
        parse_networks(cidrs)
    except ValueError as exc:
        raise ConfigError(f"WEBHOOK_ALLOWED_CIDRS: {exc}") from None
    proxy_header = text("WEBHOOK_TRUSTED_PROXY_HEADER").strip()
    if proxy_header and not all(ch.isalnum() or ch == "-" for ch in proxy_header):
        raise ConfigError("WEBHOOK_TRUSTED_PROXY_HEADER must be a header name like X-Forwarded-For")
    tls_cert, tls_key = text("GRPC_TLS_CERT").strip(), text("GRPC_TLS_KEY").strip()
    tls_client_ca = text("GRPC_TLS_CLIENT_CA").strip()
    if bool(tls_cert) != bool(tls_key):
        raise ConfigError("GRPC_TLS_CERT and GRPC_TLS_KEY go together: set both, or neither")
    if tls_client_ca and not tls_cert:
        raise ConfigError(
            "GRPC_TLS_CLIENT_CA (mutual TLS) needs GRPC_TLS_CERT and GRPC_TLS_KEY as well"
        )
    synchronous = text("HANDOFF_SQLITE_SYNCHRONOUS").upper()
    if synchronous not in ("NORMAL", "FULL", "EXTRA"):
        raise ConfigError("HANDOFF_SQLITE_SYNCHRONOUS must be NORMAL, FULL or EXTRA")
    grpc_server = text("GRPC_SERVER").strip().lower()
    if grpc_server not in GRPC_SERVERS:
        raise ConfigError(f"GRPC_SERVER must be {' or '.join(GRPC_SERVERS)}, not {grpc_server!r}")
    level = text("HANDOFF_LOG_LEVEL").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError("HANDOFF_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR")
    log_format = text("HANDOFF_LOG_FORMAT").lower()
    if log_format not in ("json", "text"):
        raise ConfigError("HANDOFF_LOG_FORMAT must be json or text")
    log_message_text = text("HANDOFF_LOG_MESSAGE_TEXT").lower()
    if log_message_text not in ("on", "off"):
        raise ConfigError("HANDOFF_LOG_MESSAGE_TEXT must be on or off")
    sandbox_agent = text("SANDBOX_AGENT").lower()
    if sandbox_agent not in ("on", "off"):
        raise ConfigError("SANDBOX_AGENT must be on or off")
    redis_url = text("REDIS_URL").strip()
    if redis_url and urlsplit(redis_url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(
            "REDIS_URL must start with redis://, rediss:// or unix:// (e.g. redis://redis:6379/0)"
        )
    prefix = text("REDIS_KEY_PREFIX")
    if not prefix or any(ch.isspace() for ch in prefix):
        raise ConfigError("REDIS_KEY_PREFIX must be non-empty, without spaces")
    base_url = text("BREVO_BASE_URL").rstrip("/")
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError(f"BREVO_BASE_URL={base_url!r} must start with http:// or https://")
    return Config(
        brevo_api_key=Secret(api_key),
        brevo_base_url=base_url,
        brevo_agent_id=agent_id if api_key else (agent_id or "SandboxServiceAgent"),
        brevo_agent_email=agent_email,
        brevo_agent_name=agent_name,
        brevo_received_from=text("BREVO_RECEIVED_FROM") or "handoff-service",
        brevo_timeout_s=number("BREVO_TIMEOUT_SECONDS", float, 0.1, 300),
        brevo_max_attempts=int(number("BREVO_MAX_ATTEMPTS", int, 1, 20)),
        webhook_token=Secret(token),
        webhook_tokens=tuple(Secret(t) for t in tokens),
        webhook_allowed_cidrs=cidrs,
        webhook_trusted_proxy_header=proxy_header,
        grpc_auth_tokens=tuple(Secret(t) for t in grpc_tokens),
        grpc_tls_cert=tls_cert,
        grpc_tls_key=tls_key,
        grpc_tls_client_ca=tls_client_ca,
        webhook_max_bytes=int(number("WEBHOOK_MAX_BYTES", int, 1024, 64 * 1024 * 1024)),
        host=text("HANDOFF_HOST"),
        grpc_port=int(number("HANDOFF_GRPC_PORT", int, 0, 65535)),
        http_port=int(number("HANDOFF_HTTP_PORT", int, 0, 65535)),
        sqlite_path=text("HANDOFF_SQLITE_PATH"),
        sqlite_synchronous=synchronous,
        redis_url=Secret(redis_url),
        redis_key_prefix=prefix,
        redis_retention_s=number("REDIS_RETENTION_SECONDS", float, 60, 366 * 24 * 3600),
        redis_stream_maxlen=int(number("REDIS_STREAM_MAXLEN", int, 100, 10_000_000)),
        redis_all_stream_maxlen=int(number("REDIS_ALL_STREAM_MAXLEN", int, 100, 100_000_000)),
        user_prefix=raw["HANDOFF_USER_PREFIX"] or "",
        closing_notice=text("HANDOFF_CLOSING_NOTICE"),
        agent_timeout_s=number("HANDOFF_AGENT_TIMEOUT_SECONDS", float, 0, 7 * 24 * 3600),
        timeout_notice=text("HANDOFF_TIMEOUT_NOTICE"),
        opening_max_chars=int(number("HANDOFF_OPENING_MAX_CHARS", int, 200, 100_000)),
        heartbeat_s=number("HANDOFF_HEARTBEAT_SECONDS", float, 0.05, 3600),
        reorder_window_s=number("HANDOFF_REORDER_WINDOW_SECONDS", float, 0, 60),
        stream_buffer=int(number("HANDOFF_STREAM_BUFFER", int, 1, 1_000_000)),
        shutdown_grace_s=number("HANDOFF_SHUTDOWN_GRACE_SECONDS", float, 0, 3600),
        grpc_max_connection_age_s=number("GRPC_MAX_CONNECTION_AGE_SECONDS", float, 0, 30 * 86400),
        grpc_max_connection_age_grace_s=number(
            "GRPC_MAX_CONNECTION_AGE_GRACE_SECONDS", float, 0, 86400
        ),
        grpc_server=grpc_server,
        log_level=level,
        log_format=log_format,
        log_message_text=log_message_text == "on",
        sandbox_port=int(number("SANDBOX_PORT", int, 0, 65535)),
        sandbox_agent=sandbox_agent == "on",
        sandbox_agent_delay_s=number("SANDBOX_AGENT_DELAY_SECONDS", float, 0, 600),
    )


def settings_table() -> str:
    """The README's configuration table, made from SETTINGS (a test keeps the README equal)."""
    rows = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        default = f"`{s.default}`" if s.default else "—"
        rows.append(f"| `{s.env}` | `{s.flag}` | {default} | {s.help} |")
    return "\n".join(rows)
