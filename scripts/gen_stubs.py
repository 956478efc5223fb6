"""Generate the Python gRPC stubs (with typed .pyi) from protos/ into service/rpc/generated/.

The proto is the single source of the stubs: they are generated on every build and never
committed. protoc names the generated modules after the proto package (``handoff.v1``);
they are rewritten to live under ``service.rpc.generated`` so that no top-level ``handoff``
package is needed on sys.path.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "service" / "rpc" / "generated"
PREFIX = "service.rpc.generated."


def main() -> int:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    protos = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    well_known = Path(protoc.__file__).parent / "_proto"
    bin_dir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={bin_dir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bin_dir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTOS}",
        f"-I{well_known}",
        f"--python_out={OUT}",
        f"--grpc_python_out={OUT}",
        f"--mypy_out={OUT}",
        f"--mypy_grpc_out={OUT}",
        *protos,
    ]
    code = protoc.main(args)
    if code != 0:
        print(f"protoc failed with exit code {code}", file=sys.stderr)
        return 1
    packages = {p.split("/")[0] for p in protos}
    pattern = re.compile(r"^(\s*)(from|import) (" + "|".join(map(re.escape, packages)) + r")\.")
    for path in OUT.rglob("*.py*"):
        lines = path.read_text().splitlines(keepends=True)
        fixed = [pattern.sub(lambda m: f"{m[1]}{m[2]} {PREFIX}{m[3]}.", line) for line in lines]
        path.write_text("".join(fixed))
    for folder in [OUT, *[d for d in OUT.rglob("*") if d.is_dir()]]:
        (folder / "__init__.py").touch()
    (OUT / "py.typed").touch()
    (OUT / ".stamp").touch()
    print(f"generated stubs for {', '.join(protos)} in {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
