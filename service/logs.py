"""Logging set-up: one JSON object per line (or text for people), the handoff id on each
line about a handoff, and every known secret masked as a last line of defence."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from datetime import UTC, datetime

from service.core.log_context import current_handoff_id

# Third-party loggers that log request URLs (webhook URLs carry the token) at INFO.
NOISY_LOGGERS = ("httpx", "httpcore", "uvicorn.access")


class RedactSecrets(logging.Filter):
    """Masks every known secret in a record's final text."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self._secrets = tuple(s for s in secrets if s)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = message
        for secret in self._secrets:
            masked = masked.replace(secret, "***")
        if masked != message:
            record.msg, record.args = masked, None
        return True


def handoff_id_of(record: logging.LogRecord) -> str:
    """The record's ``extra={"handoff_id": ...}``, else the one bound to the task."""
    given = getattr(record, "handoff_id", None)
    return given if isinstance(given, str) and given else current_handoff_id.get()


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "message", "handoff_id"?, "error"?} on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        handoff_id = handoff_id_of(record)
        if handoff_id:
            line["handoff_id"] = handoff_id
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        handoff_id = handoff_id_of(record)
        return f"{line} handoff_id={handoff_id}" if handoff_id else line


def quiet_noisy_loggers() -> None:
    """Silences the loggers that would write webhook URLs or headers, tokens and all."""
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    # uvicorn's access log is off, but it turns itself back on when this logger has a
    # handler anywhere up the tree (it asks hasHandlers()): never let it.
    logging.getLogger("uvicorn.access").disabled = True
    # GRPC_SERVER=grpclib: h2 and hpack log every header at DEBUG (bearer tokens too), and
    # grpclib a line per cancelled call at INFO.
    for name in ("hpack", "h2", "grpclib"):
        logging.getLogger(name).setLevel(logging.WARNING)


def configure_logging(level: str, secrets: Iterable[str], log_format: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RedactSecrets(secrets))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    quiet_noisy_loggers()
