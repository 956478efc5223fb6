#!/usr/bin/env bash
# Makes sure the tools of `make stubs` (scripts/gen_client_stubs.sh) and of
# tests/test_client_stubs.py are installed, installing what is missing:
#
#   - with apt-get (Debian 12): the protoc plugins for Go and Java, protoc itself (its built-in
#     Java generator), and what the test compiles the generated code with offline: Go with
#     Debian's gRPC and protobuf Go sources (GOPATH mode), javac with Debian's protobuf-java
#     and grpc-java jars, Node.js for TypeScript;
#   - with `npm ci`, from scripts/stub-tools/package{,-lock}.json: ts-proto (the TypeScript
#     plugin) and typescript, @grpc/grpc-js, @bufbuild/protobuf and @types/node, into
#     build/stub-tools/ (never committed).
#
# buf itself is a Python dev dependency (.venv/bin/buf). Prints nothing when everything is
# there; fails loudly rather than letting the tests be skipped.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TOOLS="$ROOT/build/stub-tools"
SPEC="$ROOT/scripts/stub-tools"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
# want <command or absolute path> <Debian package that provides it>
want() {
    case "$1" in
    /*) [ -e "$1" ] ;;
    *) command -v "$1" >/dev/null 2>&1 ;;
    esac || missing+=("$2")
}

want protoc protobuf-compiler
want protoc-gen-go protoc-gen-go
want protoc-gen-go-grpc protoc-gen-go-grpc
want grpc_java_plugin protobuf-compiler-grpc-java-plugin
want go golang-go
want /usr/share/gocode/src/google.golang.org/protobuf/proto/proto.go golang-google-protobuf-dev
want /usr/share/gocode/src/google.golang.org/grpc/server.go golang-google-grpc-dev
# gRPC-Go 1.33 decodes through github.com/golang/protobuf: it must be the v1.5 one, built on
# google.golang.org/protobuf, which protoc-gen-go's code needs (apt would pick v1.3 by itself).
want /usr/share/gocode/src/github.com/golang/protobuf/proto/registry.go golang-github-golang-protobuf-1-5-dev
want javac default-jdk-headless
want /usr/share/java/protobuf.jar libprotobuf-java
want /usr/share/java/grpc-stub.jar libgrpc-java
want /usr/share/java/guava.jar libguava-java
want /usr/share/java/geronimo-annotation-1.3-spec.jar libgeronimo-annotation-1.3-spec-java
want node nodejs
want npm npm

if [ "${#missing[@]}" -gt 0 ]; then
    echo "ensure-stub-tools: installing ${missing[*]} with apt-get" >&2
    if ! log="$({ as_root apt-get update -qq &&
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}"; } 2>&1)"; then
        echo "$log" >&2
        echo "ensure-stub-tools: cannot install ${missing[*]}; install them (apt-get install ${missing[*]}) and run again" >&2
        exit 1
    fi
fi

# npm ci again whenever the committed package files differ from those last installed.
if ! cmp -s "$SPEC/package.json" "$TOOLS/package.json" ||
    ! cmp -s "$SPEC/package-lock.json" "$TOOLS/package-lock.json" ||
    [ ! -x "$TOOLS/node_modules/.bin/protoc-gen-ts_proto" ] ||
    [ ! -x "$TOOLS/node_modules/.bin/tsc" ]; then
    echo "ensure-stub-tools: installing ts-proto and typescript with npm ci into build/stub-tools" >&2
    rm -rf "$TOOLS"
    mkdir -p "$TOOLS"
    cp "$SPEC/package.json" "$SPEC/package-lock.json" "$TOOLS/"
    # --ignore-scripts: none of these packages needs an install script.
    if ! log="$(cd "$TOOLS" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error 2>&1)"; then
        echo "$log" >&2
        rm -rf "$TOOLS"
        echo "ensure-stub-tools: npm ci failed in build/stub-tools" >&2
        exit 1
    fi
fi
