#!/usr/bin/env bash
# make bench-grpc-floor: bench/grpc_floor.py (a grpc.aio server keeping nothing for a stream,
# and STREAMS idle streams opened on it) under each grpcio release named, each in a virtual
# environment of its own under build/grpc-floor/ holding grpcio alone. One JSON line a release.
# FLOOR_ARGS: more arguments to bench/grpc_floor.py (--python-share: Python's part as well).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ "$#" -eq 0 ]; then
    echo "usage: $0 GRPCIO_VERSION..." >&2
    exit 2
fi
for version in "$@"; do
    venv="build/grpc-floor/$version"
    if ! "$venv/bin/python" -c "import grpc" 2>/dev/null; then
        "$PYTHON" -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet "grpcio==$version"
    fi
    # shellcheck disable=SC2086 # FLOOR_ARGS is a list of words
    "$venv/bin/python" bench/grpc_floor.py --streams "${STREAMS:-10000}" ${FLOOR_ARGS:-}
done
