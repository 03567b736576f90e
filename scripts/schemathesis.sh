#!/usr/bin/env bash
# Property-based API testing with Schemathesis against a real daemon: builds the binaries,
# creates a throwaway database, starts webhook-sink and the dispatcher (with API_TOKEN set), and
# lets Schemathesis generate requests from the daemon's own /openapi.json — valid ones and
# invalid ones — checking every answer: no 5xx, status codes, content types, headers and bodies
# as documented, invalid input refused, valid input accepted, auth enforced. Then it stops both
# processes by pid and drops the database. Exits non-zero on any finding.
#
#   scripts/schemathesis.sh
#
# Overrides: TEST_DATABASE_URL (admin URL of the PostgreSQL server, default
# postgres://postgres@127.0.0.1:5432/postgres), SCHEMATHESIS_EXAMPLES (cases per operation and
# phase, default 300), SCHEMATHESIS_SEED (reproduce a run), SCHEMATHESIS_MAX_TIME (seconds).
# Schemathesis is installed from PyPI into target/schemathesis-venv the first time.
set -euo pipefail
cd "$(dirname "$0")/.."

version=4.32.5 # pinned: a new release may add checks; bump deliberately
venv=$PWD/target/schemathesis-venv
work=target/schemathesis # Schemathesis keeps a cache in its working directory: not in the repo
admin_url=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
examples=${SCHEMATHESIS_EXAMPLES:-300}
token=schemathesis-$RANDOM$RANDOM

say() { printf '==> %s\n' "$*"; }

if ! "$venv/bin/schemathesis" --version 2>/dev/null | grep -qF "$version"; then
    say "Installing schemathesis $version into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$version"
fi
command -v psql >/dev/null || { echo "psql is needed (apt-get install -y postgresql-client)" >&2; exit 1; }

say "Building"
cargo build --quiet --bins
bin=target/debug

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
port=$(free_port)
sink_port=$(free_port)
db=md_schemathesis_$$_$RANDOM
db_url="${admin_url%/*}/$db"
log=$(mktemp)
daemon_pid=
sink_pid=

cleanup() {
    local pid
    for pid in $daemon_pid $sink_pid; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    psql "$admin_url" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true
    rm -f "$log"
}
trap cleanup EXIT

say "Creating database $db"
psql "$admin_url" -qc "CREATE DATABASE $db"

"$bin/webhook-sink" --addr "127.0.0.1:$sink_port" >/dev/null 2>&1 &
sink_pid=$!
env -i PATH="$PATH" \
    DATABASE_URL="$db_url" \
    WEBHOOK_URL="http://127.0.0.1:$sink_port/webhook" \
    SERVER_HOST=127.0.0.1 SERVER_PORT="$port" \
    API_TOKEN="$token" \
    PROCESSING_INTERVAL=200ms BATCH_SIZE=50 \
    LOG_LEVEL=warn \
    "$bin/message-dispatcher" serve 2>"$log" &
daemon_pid=$!

health() {
    python3 - "$port" <<'EOF'
import sys, urllib.request
try:
    with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/health", timeout=5) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
EOF
}
for _ in $(seq 100); do
    health && break
    kill -0 "$daemon_pid" 2>/dev/null || { cat "$log" >&2; echo "the daemon exited" >&2; exit 1; }
    sleep 0.2
done
health || { cat "$log" >&2; echo "the daemon did not become healthy" >&2; exit 1; }

say "Schemathesis against http://127.0.0.1:$port/openapi.json"
args=(
    run "http://127.0.0.1:$port/openapi.json"
    --checks all
    --header "Authorization: Bearer $token"
    --max-examples "$examples"
    --workers 2
    --generation-database none
    --request-timeout 10
    --report junit --report-dir report
    --no-color
)
[[ -n "${SCHEMATHESIS_SEED:-}" ]] && args+=(--seed "$SCHEMATHESIS_SEED")
[[ -n "${SCHEMATHESIS_MAX_TIME:-}" ]] && args+=(--max-time "$SCHEMATHESIS_MAX_TIME")
status=0
mkdir -p "$work"
(cd "$work" && "$venv/bin/schemathesis" "${args[@]}") || status=$?

# Whatever Schemathesis sent, the daemon must still be up and healthy, and must not have panicked.
if ! health; then
    echo "FAIL: /health is not 200 after the run" >&2
    status=1
fi
if grep -qiE 'panicked|"level":"error"' "$log"; then
    echo "FAIL: the daemon logged errors:" >&2
    grep -iE 'panicked|"level":"error"' "$log" | head -20 >&2
    status=1
fi
stored=$(psql "$db_url" -tAc "SELECT count(*) FROM messages")
say "Messages the generated requests enqueued: $stored (report: $work/report)"
exit "$status"
