#!/usr/bin/env bash
# What tests/containers.rs needs, made or reused, one step per call:
#
#   setup.sh engine     a Docker engine answers: reuse one, else install docker.io if missing and
#                       start `dockerd --bridge=none --iptables=false` (loopback only: every
#                       container uses --network host). Prints "started PID" or "reused".
#   setup.sh base       image message-dispatcher-test/systemd:bookworm: Debian 12 minbase with
#                       systemd and dbus (debootstrap, ~4 min cold), for the systemd and .deb
#                       tests and as the stand-ins' base. The root fs is kept in the cache.
#   setup.sh standins   images message-dispatcher-test/postgres:15 and .../redis:7 (Debian's
#                       packages; standins.Dockerfile) for the Compose test.
#   setup.sh cargo-deb  cargo-deb (cargo install, cached in the cache directory); prints its bin dir.
#   setup.sh compose    docker-compose (Debian's 1.29) when no Compose is installed.
#
# Cache: /var/cache/message-dispatcher-test (MD_TEST_CACHE). Images stay in the engine; a later
# run reuses them. Remove the directory and the images to start cold.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${MD_TEST_CACHE:-/var/cache/message-dispatcher-test}
base_image=message-dispatcher-test/systemd:bookworm
mkdir -p "$cache"

say() { printf '[setup] %s\n' "$*" >&2; }

apt_install() {
    say "apt-get install $*"
    if [[ ! -e $cache/apt-updated ]] || [[ -n $(find "$cache/apt-updated" -mmin +600) ]]; then
        apt-get update -qq && touch "$cache/apt-updated"
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

engine() {
    if docker info >/dev/null 2>&1; then
        echo reused
        return
    fi
    if [[ $(id -u) -ne 0 ]]; then
        echo "no Docker engine answers and this user ($(id -un)) cannot start one (needs root)" >&2
        exit 1
    fi
    command -v dockerd >/dev/null || apt_install docker.io
    command -v docker >/dev/null || apt_install docker.io
    say "starting dockerd --bridge=none --iptables=false (log: $cache/dockerd.log)"
    setsid dockerd --bridge=none --iptables=false >"$cache/dockerd.log" 2>&1 </dev/null &
    local pid=$!
    for _ in $(seq 120); do
        if docker info >/dev/null 2>&1; then
            echo "started $pid"
            return
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "dockerd exited at start:" >&2
            tail -20 "$cache/dockerd.log" >&2
            exit 1
        fi
        sleep 0.5
    done
    echo "dockerd (pid $pid) does not answer after 60 s:" >&2
    tail -20 "$cache/dockerd.log" >&2
    kill "$pid" 2>/dev/null || true
    exit 1
}

base() {
    if docker image inspect "$base_image" >/dev/null 2>&1; then
        say "$base_image: reused"
        return
    fi
    local rootfs=$cache/rootfs-bookworm-systemd
    if [[ ! -x $rootfs/lib/systemd/systemd ]]; then
        command -v debootstrap >/dev/null || apt_install debootstrap
        rm -rf "$rootfs.tmp"
        say "debootstrap bookworm (minbase + systemd, dbus) into $rootfs"
        debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus \
            bookworm "$rootfs.tmp" http://deb.debian.org/debian >"$cache/debootstrap.log" 2>&1 \
            || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
        mv "$rootfs.tmp" "$rootfs"
    fi
    say "docker import $rootfs -> $base_image"
    tar -C "$rootfs" -c . | docker import - "$base_image" >/dev/null
}

standins() {
    # Rebuilt when their files change: the images carry a hash of them.
    local hash
    hash=$(cat "$here/standins.Dockerfile" "$here/postgres-entrypoint.sh" | sha256sum | cut -c1-16)
    local label='{{index .Config.Labels "message-dispatcher-test.hash"}}'
    if [[ $(docker image inspect -f "$label" message-dispatcher-test/postgres:15 2>/dev/null) == "$hash" ]] \
        && [[ $(docker image inspect -f "$label" message-dispatcher-test/redis:7 2>/dev/null) == "$hash" ]]; then
        say "stand-in images: reused"
        return
    fi
    base
    for target in postgres redis; do
        local tag=message-dispatcher-test/$target:15
        [[ $target == redis ]] && tag=message-dispatcher-test/redis:7
        say "building $tag from Debian packages"
        # The classic builder: no BuildKit needed for this plain file.
        DOCKER_BUILDKIT=0 docker build -q --network host --build-arg BASE="$base_image" --target "$target" \
            --label "message-dispatcher-test.hash=$hash" \
            -f "$here/standins.Dockerfile" -t "$tag" "$here" >/dev/null
    done
}

cargo_deb() {
    local version=3.8.0 # pinned: the packaging test checks its output
    local root=$cache/cargo-deb-$version
    # One install at a time (scripts/test.sh may have started one in the background).
    exec 9>"$cache/cargo-deb.lock"
    flock 9
    if [[ ! -x $root/bin/cargo-deb ]]; then
        say "cargo install cargo-deb $version (once; cached in $root)"
        cargo install --quiet --locked --root "$root" --version "$version" cargo-deb
    fi
    echo "$root/bin"
}

case ${1:-} in
compose) command -v docker-compose >/dev/null || apt_install docker-compose ;;
engine) engine ;;
base) base ;;
standins) standins ;;
cargo-deb) cargo_deb ;;
*) echo "usage: $0 engine|base|standins|cargo-deb|compose" >&2; exit 2 ;;
esac
