#!/usr/bin/env bash
# The demo: builds the binaries, migrates a `demo` database on the local PostgreSQL, starts
# webhook-sink and the dispatcher with a short interval, adds test messages and shows them
# being delivered. Ctrl-C stops everything cleanly.
#
#   scripts/demo.sh            run until Ctrl-C
#   scripts/demo.sh --once     stop by itself once every message is delivered (used by the tests)
#
# Overrides: DEMO_DATABASE_URL, DEMO_ADMIN_URL, DEMO_PORT (8080), DEMO_SINK_PORT (9090),
# DEMO_MESSAGES (20), DEMO_BIN_DIR (skip the build, use binaries from there).
set -euo pipefail
cd "$(dirname "$0")/.."

once=false
[[ "${1:-}" == "--once" ]] && once=true

admin_url=${DEMO_ADMIN_URL:-postgres://postgres@127.0.0.1:5432/postgres}
database_url=${DEMO_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/demo}
port=${DEMO_PORT:-8080}
sink_port=${DEMO_SINK_PORT:-9090}
messages=${DEMO_MESSAGES:-20}
log_dir=$(mktemp -d)

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

if [[ -z "${DEMO_BIN_DIR:-}" ]]; then
    say "Building (release)"
    cargo build --release --bins
    bin=target/release
else
    bin=$DEMO_BIN_DIR
fi

command -v psql >/dev/null || { echo "psql is needed (apt-get install -y postgresql-client)" >&2; exit 1; }
db_name=${database_url##*/}
if ! psql "$admin_url" -tAc "SELECT 1 FROM pg_database WHERE datname = '$db_name'" | grep -q 1; then
    say "Creating database $db_name"
    psql "$admin_url" -qc "CREATE DATABASE \"$db_name\""
fi

export DATABASE_URL=$database_url
say "Migrating $db_name"
"$bin/message-dispatcher" migrate

sink_pid=""
dispatcher_pid=""
cleanup() {
    trap - INT TERM EXIT
    if [[ -n "$dispatcher_pid" ]] && kill -0 "$dispatcher_pid" 2>/dev/null; then
        say "Stopping the dispatcher (SIGTERM: in-flight messages finish, the lease is released)"
        kill -TERM "$dispatcher_pid" 2>/dev/null || true
        wait "$dispatcher_pid" 2>/dev/null || true
    fi
    if [[ -n "$sink_pid" ]]; then
        kill "$sink_pid" 2>/dev/null || true
        wait "$sink_pid" 2>/dev/null || true
    fi
    rm -rf "$log_dir"
}
trap cleanup EXIT
trap 'exit 0' INT TERM

say "Starting webhook-sink on 127.0.0.1:$sink_port"
"$bin/webhook-sink" --addr "127.0.0.1:$sink_port" > >(sed -u 's/^/[sink] /') 2>&1 &
sink_pid=$!

say "Starting message-dispatcher (every 1s, 5 messages a batch, API on :$port)"
WEBHOOK_URL="http://127.0.0.1:$sink_port/webhook" \
PROCESSING_INTERVAL=1s BATCH_SIZE=5 SERVER_PORT=$port SERVER_HOST=127.0.0.1 \
LOG_FORMAT=text LOG_LEVEL=debug \
    "$bin/message-dispatcher" serve 2> >(sed -u 's/^/[dispatcher] /' >&2) &
dispatcher_pid=$!

for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    kill -0 "$dispatcher_pid" 2>/dev/null || { echo "the dispatcher exited" >&2; exit 1; }
    sleep 0.1
done
say "Health: $(curl -sS "http://127.0.0.1:$port/health")"

say "Adding $messages test messages"
"$bin/add-test-messages" "$messages"

counts() { psql "$database_url" -tAc "SELECT string_agg(status || '=' || n, ' ' ORDER BY status) FROM (SELECT status, count(*) n FROM messages GROUP BY status) s"; }
pending() { psql "$database_url" -tAc "SELECT count(*) FROM messages WHERE status IN ('pending', 'sending')"; }

while [[ "$(pending)" != 0 ]]; do
    say "Messages: $(counts)"
    sleep 1
done
say "Messages: $(counts) — all delivered"
say "Last sent: $(curl -sS "http://127.0.0.1:$port/messages/sent?limit=2")"

if $once; then
    exit 0
fi
say "Still running: add more with '$bin/add-test-messages 10' (DATABASE_URL=$database_url); Ctrl-C stops"
wait "$dispatcher_pid"
