"""The handoff a piece of work is about, for log lines: set once, seen by every line after.

A context variable follows the task that set it (each gRPC call and each webhook runs in
its own), so concurrent calls never see each other's id.
"""

from __future__ import annotations

from contextvars import ContextVar

current_handoff_id: ContextVar[str] = ContextVar("current_handoff_id", default="")


def bind_handoff(handoff_id: str) -> None:
    """From now on in this task, log lines name ``handoff_id``."""
    current_handoff_id.set(handoff_id)
