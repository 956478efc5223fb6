"""The gRPC contract follows buf's STANDARD lint rules and breaks nothing since the last release.

buf comes from the buf-bin dev dependency, next to this interpreter; without it these tests
fail rather than skip. It runs offline: buf.yaml has no deps, and each run gets an empty cache
of its own. The released contract is the committed copy in protos-released/ (see its README).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUF = Path(sys.executable).parent / "buf"
RELEASED = ROOT / "protos-released"
PROTO = Path("protos") / "handoff" / "v1" / "handoff.proto"


def buf(tmp_path: Path, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    assert BUF.is_file(), f"{BUF} is missing: install the dev dependencies (make)"
    env = {**os.environ, "BUF_CACHE_DIR": str(tmp_path / "buf-cache")}
    return subprocess.run(  # noqa: S603 - a fixed binary and arguments
        [str(BUF), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def module_copy(tmp_path: Path) -> Path:
    """A copy of the repository's buf module (buf.yaml and protos/) to break."""
    copy = tmp_path / "module"
    copy.mkdir()
    shutil.copy(ROOT / "buf.yaml", copy / "buf.yaml")
    shutil.copytree(ROOT / "protos", copy / "protos")
    return copy


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} is not in {path} exactly once"
    path.write_text(text.replace(old, new))


def problems(result: subprocess.CompletedProcess[str]) -> list[tuple[str, str]]:
    """(rule, message) of each problem buf reported with --error-format json."""
    found = []
    for line in result.stdout.splitlines():
        problem = json.loads(line)
        found.append((str(problem["type"]), str(problem["message"])))
    return found


def test_the_released_contract_is_committed() -> None:
    released = sorted(p.relative_to(RELEASED) for p in RELEASED.rglob("*.proto"))
    assert released == [PROTO.relative_to("protos")]


def test_lint_is_clean(tmp_path: Path) -> None:
    result = buf(tmp_path, "lint")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_nothing_breaks_since_the_last_release(tmp_path: Path) -> None:
    result = buf(tmp_path, "breaking", "--against", str(RELEASED))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_breaking_check_catches_a_deleted_field_and_a_renamed_rpc(
    tmp_path: Path, module_copy: Path
) -> None:
    proto = module_copy / PROTO
    edit(proto, "  string notice = 2;\n", "")
    edit(proto, "rpc GetHandoff(", "rpc FetchHandoff(")
    result = buf(
        tmp_path, "breaking", "--against", str(RELEASED), "--error-format", "json", cwd=module_copy
    )
    assert result.returncode != 0
    assert problems(result) == [
        (
            "RPC_NO_DELETE",
            'Previously present RPC "GetHandoff" on service "HandoffService" was deleted.',
        ),
        (
            "FIELD_NO_DELETE",
            'Previously present field "2" with name "notice" on message "StopHandoffRequest"'
            " was deleted.",
        ),
    ]


def test_breaking_check_catches_a_changed_field_number(tmp_path: Path, module_copy: Path) -> None:
    edit(module_copy / PROTO, "  string after_cursor = 2;", "  string after_cursor = 3;")
    result = buf(
        tmp_path, "breaking", "--against", str(RELEASED), "--error-format", "json", cwd=module_copy
    )
    assert result.returncode != 0
    assert (
        "FIELD_NO_DELETE",
        'Previously present field "2" with name "after_cursor" on message'
        ' "StreamAgentRepliesRequest" was deleted.',
    ) in problems(result)


def test_an_additive_change_is_not_breaking(tmp_path: Path, module_copy: Path) -> None:
    edit(
        module_copy / PROTO,
        "  string notice = 2;\n",
        "  string notice = 2;\n  // Why the bot stopped.\n  string reason = 3;\n",
    )
    result = buf(tmp_path, "breaking", "--against", str(RELEASED), cwd=module_copy)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_lint_catches_a_style_violation(tmp_path: Path, module_copy: Path) -> None:
    edit(
        module_copy / PROTO,
        "message GetHandoffRequest {\n  // The handoff's id. Required.\n  string handoff_id = 1;",
        "message GetHandoffRequest {\n  // The handoff's id. Required.\n  string handoffId = 1;",
    )
    result = buf(tmp_path, "lint", "--error-format", "json", cwd=module_copy)
    assert result.returncode != 0
    assert problems(result) == [
        (
            "FIELD_LOWER_SNAKE_CASE",
            'Field name "handoffId" should be lower_snake_case, such as "handoff_id".',
        )
    ]
