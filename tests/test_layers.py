"""The core knows no transport: ``service/core`` imports no gRPC, HTTP, web framework or
storage library, and nothing of the service outside the core; the adapters around it do."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "service" / "core"
TRANSPORTS = {
    "aiohttp",
    "google",  # protobuf
    "grpc",
    "httpcore",
    "httpx",
    "prometheus_client",
    "redis",
    "sqlite3",
    "starlette",
    "uvicorn",
    "yarl",
}


def imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def test_the_core_imports_no_transport_and_no_adapter() -> None:
    files = sorted(CORE.glob("*.py"))
    assert len(files) >= 10  # the core's modules were found
    offending = {
        f"{path.name}: {module}"
        for path in files
        for module in imported_modules(path)
        if module.split(".")[0] in TRANSPORTS
        or (module.startswith("service.") and not module.startswith("service.core"))
    }
    assert offending == set()


def test_the_check_sees_an_import_of_a_transport(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import json\nfrom grpc import aio\nimport service.storage.sqlite\n")
    assert imported_modules(sample) == {"json", "grpc", "service.storage.sqlite"}
