#!/usr/bin/env bash
# Generates the gRPC client code of protos/ for Go, Java and TypeScript (Node) into
# build/stubs/{go,java,ts}, or into the folder given as the only argument. Never committed.
#
#   scripts/gen_client_stubs.sh [OUT_DIR]
#
# buf (.venv/bin/buf) compiles the contract and runs the locally installed plugins listed in
# buf.gen.yaml; nothing is fetched and no remote plugin is used. scripts/ensure-stub-tools.sh
# installs the plugins (`make stubs` runs it first). What comes out:
#
#   go/handoff/v1/handoff.pb.go, handoff_grpc.pb.go       package handoffv1, import path
#                                                           brevo-handoff/gen/go/handoff/v1
#   java/com/handoff/v1/*.java, HandoffServiceGrpc.java   package com.handoff.v1
#   ts/handoff/v1/handoff.ts, ts/google/protobuf/*.ts      ts-proto, services for @grpc/grpc-js
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$ROOT/build/stubs}"
BUF="$ROOT/.venv/bin/buf"

problems=()
[ -x "$BUF" ] || problems+=("$BUF (the buf-bin dev dependency: make)")
for tool in protoc protoc-gen-go protoc-gen-go-grpc grpc_java_plugin; do
    command -v "$tool" >/dev/null 2>&1 || problems+=("$tool")
done
[ -x "$ROOT/build/stub-tools/node_modules/.bin/protoc-gen-ts_proto" ] ||
    problems+=("build/stub-tools/node_modules/.bin/protoc-gen-ts_proto")
if [ "${#problems[@]}" -gt 0 ]; then
    printf 'gen_client_stubs: missing %s\n' "${problems[@]}" >&2
    echo "gen_client_stubs: run scripts/ensure-stub-tools.sh (or make stubs) first" >&2
    exit 1
fi

mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
rm -rf "$OUT/go" "$OUT/java" "$OUT/ts"
cd "$ROOT" # buf.gen.yaml names the ts-proto plugin relative to the repository
export BUF_CACHE_DIR="${BUF_CACHE_DIR:-$ROOT/build/cache/buf}"
"$BUF" generate --template buf.gen.yaml --output "$OUT"
echo "generated Go, Java and TypeScript client stubs in $OUT"
