#!/usr/bin/env bash
# Runs every test: unit tests, the integration tests against the local PostgreSQL and Redis
# (each test makes its own database and Redis key), the static checks of the deployment files,
# and a smoke run of the demo.
set -euo pipefail
cd "$(dirname "$0")/.."

pg=${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
redis=${TEST_REDIS_URL:-redis://127.0.0.1:6379/}

need() { # need COMMAND DEBIAN-PACKAGE
    command -v "$1" >/dev/null 2>&1 && return 0
    echo "==> installing $2 (for $1)"
    if [[ $(id -u) -eq 0 ]]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
    else
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null
    fi
}
need psql postgresql-client
need redis-server redis-server
need redis-cli redis-tools
need curl curl
need openssl openssl

if ! psql "$pg" -tAc 'SELECT 1' >/dev/null 2>&1; then
    echo "PostgreSQL is not reachable at $pg (set TEST_DATABASE_URL)." >&2
    exit 1
fi
if ! redis-cli -u "$redis" ping >/dev/null 2>&1; then
    echo "Redis is not reachable at $redis (set TEST_REDIS_URL)." >&2
    exit 1
fi

# The container tests' slowest preparations — the static release build behind the image and
# the .deb, and cargo-deb — are CPU work that does not need the engine: start them now, beside
# the debug build, so they overlap its single-threaded phases. The container tests wait for
# them (cargo's lock on the build directory, setup.sh's on cargo-deb).
prep_pid=
if [[ ${MD_CONTAINER_TESTS:-} != skip ]]; then
    mkdir -p /var/cache/message-dispatcher-test 2>/dev/null || true
    mkdir -p target
    setsid bash -c 'scripts/image.sh --binaries-only && tests/containers/setup.sh cargo-deb' \
        >target/container-prep.log 2>&1 </dev/null &
    prep_pid=$! # its own process group: stopped as a whole if this script ends first
fi

log=$(mktemp)
# (Under set -e a failing last command of an && list would become the script's exit status.)
trap 'rm -f "$log"; if [[ -n $prep_pid ]]; then kill -- "-$prep_pid" 2>/dev/null || true; fi' EXIT
status=0
cargo test --all-targets "$@" 2>&1 | tee "$log" || status=$?
# One closing line for the whole run, summed over every test binary.
# The fault campaign (tests/chaos, no libtest harness) prints its own 'N passed, N failed' line.
awk '/^test result:/ { passed += $4; failed += $6 }
     /^[0-9]+ passed, [0-9]+ failed$/ { passed += $1; failed += $3 }
     END { printf "%d passed, %d failed\n", passed, failed }' "$log"
exit "$status"
