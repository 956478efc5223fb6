"""The README stays true: its configuration table and the make targets it shows."""

from __future__ import annotations

import re
from pathlib import Path

from service.config import settings_table

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_configuration_table_is_the_one_the_code_reads() -> None:
    assert settings_table() in README


def test_every_make_command_shown_exists() -> None:
    shown = set(re.findall(r"\bmake ([a-z][a-z-]*)", README))
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, flags=re.MULTILINE))
    assert {"run", "test", "demo", "proto"} <= shown
    assert shown <= targets
