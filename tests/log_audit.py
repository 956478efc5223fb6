"""No secret in any log line of the whole test run.

Every log record of the test process (at DEBUG, formatted as the service formats them) and
every line of output of the service processes the tests start is kept, then checked at the
end of the session against every secret the tests used: the constants named like secrets
in the test modules, each configuration's secrets, and anything shaped like a Brevo API key
or a sandbox key. A hit fails the run (see conftest.py).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import ModuleType

from service.logs import JsonFormatter

# A Brevo API key, and the key the sandbox makes up for itself.
SECRET_SHAPES = (re.compile(r"xkeysib-[A-Za-z0-9_-]{6,}"), re.compile(r"sandbox-[0-9a-f]{16}"))
SECRET_NAME = re.compile(r"(KEY|TOKEN|PASSWORD|SECRET)")


@dataclass(frozen=True)
class Leak:
    source: str
    secret: str
    line: str

    def describe(self) -> str:
        masked = self.secret[:4] + "…" if len(self.secret) > 4 else "…"
        return f"{self.source}: {masked} in {self.line.replace(self.secret, '<SECRET>')[:300]}"


@dataclass
class LogAudit:
    secrets: set[str] = field(default_factory=set)
    lines: list[tuple[str, str]] = field(default_factory=list)

    def add_secrets(self, values: Iterable[str]) -> None:
        self.secrets.update(v for v in values if len(v) >= 8)

    def add_module_secrets(self, module: ModuleType) -> None:
        """Module-level string constants named like secrets (API_KEY, TOKEN, ...)."""
        self.add_secrets(
            value
            for name, value in vars(module).items()
            if name.isupper() and SECRET_NAME.search(name) and isinstance(value, str)
        )

    def record(self, source: str, text: str) -> None:
        self.lines.extend((source, line) for line in text.splitlines() if line)

    def leaks(self) -> list[Leak]:
        found: list[Leak] = []
        for source, line in self.lines:
            for secret in self.secrets:
                if secret in line:
                    found.append(Leak(source, secret, line))
            for shape in SECRET_SHAPES:
                found.extend(Leak(source, m.group(0), line) for m in shape.finditer(line))
        return found


class AuditHandler(logging.Handler):
    """Hands every record, formatted as the service would write it, to ``audit``."""

    def __init__(self, audit: LogAudit) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self._audit = audit

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._audit.record("test process", self.format(record))
        except Exception:  # a broken record must not break the test that logged it
            self.handleError(record)


AUDIT = LogAudit()


def audit_output(source: str, text: str) -> None:
    """Output of a process a test started (a service replica, an example client)."""
    AUDIT.record(source, text)
