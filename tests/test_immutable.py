"""``@immutable`` value classes: frozen for the type checker, cheap to build at run time."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mypy import api as mypy_api

from service.core.immutable import immutable
from service.core.models import Agent, AgentMessage


@immutable
class _Point:
    x: int
    y: int = 0


def test_an_immutable_class_is_a_slots_dataclass_compared_and_hashed_by_value() -> None:
    assert [f.name for f in dataclasses.fields(_Point)] == ["x", "y"]
    assert not hasattr(_Point(1), "__dict__")  # slots
    assert _Point(1) == _Point(1, 0)
    assert _Point(1) != _Point(2)
    assert len({_Point(1), _Point(1, 0), _Point(2)}) == 2
    assert dataclasses.replace(_Point(1), y=5) == _Point(1, 5)
    agent = Agent("a-1", "Marta")
    assert {agent: 1}[Agent("a-1", "Marta")] == 1
    message = AgentMessage("m-1", agent, "hello")
    assert hash(message) == hash(AgentMessage("m-1", Agent("a-1", "Marta"), "hello"))


def test_mypy_refuses_an_assignment_to_a_field_of_an_immutable_class(tmp_path: Path) -> None:
    sample = tmp_path / "assigns.py"
    sample.write_text(
        "from service.core.models import Agent\n"
        "agent = Agent('a-1', 'Marta')\n"
        "agent.name = 'Ana'\n"
        "print(agent.id)\n"
    )
    out, _, status = mypy_api.run(
        ["--strict", "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(sample)]
    )
    assert status == 1, out
    assert 'assigns.py:3: error: Property "name" defined in "Agent" is read-only' in out
    assert "Found 1 error in 1 file" in out
