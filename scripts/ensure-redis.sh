#!/usr/bin/env bash
# Makes sure redis-server is installed and that one answers on 127.0.0.1:6379.
#
# The tests start private redis-servers of their own (from this binary) so that they can
# stop and restart them; the one on 6379 is for `REDIS_URL=redis://127.0.0.1:6379/0 make run`.
# Fails loudly rather than letting the Redis tests be skipped.
set -euo pipefail

PORT="${REDIS_PORT:-6379}"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

if ! command -v redis-server >/dev/null 2>&1; then
    echo "ensure-redis: redis-server is missing; installing it with apt-get" >&2
    if ! { as_root apt-get update -qq &&
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; } >/dev/null; then
        echo "ensure-redis: cannot install redis-server; install it (apt-get install redis-server) and run again" >&2
        exit 1
    fi
fi

ping() {
    redis-cli -h 127.0.0.1 -p "$PORT" ping 2>/dev/null | grep -q PONG
}

if ! ping; then
    dir=/var/lib/redis
    logfile=/var/log/redis/ci.log
    if ! mkdir -p "$dir" /var/log/redis 2>/dev/null || [ ! -w "$dir" ]; then
        dir="${TMPDIR:-/tmp}/handoff-redis"
        logfile="$dir/redis.log"
        mkdir -p "$dir"
    fi
    echo "ensure-redis: starting redis-server on 127.0.0.1:$PORT" >&2
    redis-server --daemonize yes --bind 127.0.0.1 --port "$PORT" --save "" \
        --appendonly no --dir "$dir" --logfile "$logfile"
    for _ in $(seq 50); do
        ping && break
        sleep 0.1
    done
    if ! ping; then
        echo "ensure-redis: redis-server did not answer on 127.0.0.1:$PORT; see $logfile" >&2
        exit 1
    fi
fi
