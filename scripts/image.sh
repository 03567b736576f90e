#!/usr/bin/env bash
# Builds the runtime image (default tag message-dispatcher:local).
#
#   scripts/image.sh [TAG]
#   scripts/image.sh --binaries-only   only the host's static binaries (scripts/test.sh starts
#                                      this early, so it overlaps the debug build)
#
# Where the builder image (rust:1-alpine) can be pulled: a plain BuildKit `docker build` of the
# Dockerfile (static musl binaries, the default). Where it cannot (offline, no registry): the
# same Dockerfile's same runtime stage, fed through --build-arg BINARIES=prebuilt with static
# glibc (static-pie) binaries built here on the host. Either way the image is the Dockerfile's
# `runtime` stage: scratch, the three binaries in /app, a CA bundle, user 65532, HEALTHCHECK.
#
# Overrides:
#   IMAGE_BUILD=auto|docker|prebuilt   force one way (default auto: docker if rust:1-alpine
#                                      is present or can be pulled)
#   IMAGE_TARGET_DIR                   cargo target dir of the host build (default:
#                                      target/, or /var/cache/message-dispatcher-test/target
#                                      when that exists, so test runs reuse compiled crates)
# Needs: a Docker engine, and BuildKit (`docker buildx`, or the Debian docker.io client with
# DOCKER_BUILDKIT=1). Prints the image's size at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
# Run from `cargo test`, the environment carries the test's CARGO_MANIFEST_DIR & co; some build
# scripts (ring's) track them, and the release build would start over each time.
while read -r var; do unset "$var"; done < <(compgen -e | grep -E '^CARGO_' | grep -vxE 'CARGO_HOME|CARGO_TARGET_DIR')

binaries_only=false
if [[ ${1:-} == --binaries-only ]]; then
    binaries_only=true
    shift
fi
tag=${1:-message-dispatcher:local}
mode=${IMAGE_BUILD:-auto}
rust_image=rust:1-alpine

say() { printf '==> %s\n' "$*" >&2; }

# A BuildKit build, with whichever client provides it.
buildkit() {
    if docker buildx version >/dev/null 2>&1; then
        docker buildx build --load "$@"
    elif [[ -x /usr/bin/docker ]] && [[ $(/usr/bin/docker version -f '{{.Client.Version}}' 2>/dev/null) =~ ^(19|20)\. ]]; then
        # Debian 12's docker.io client (20.10) speaks BuildKit itself; clients from 23 on need
        # the buildx plugin for it.
        DOCKER_BUILDKIT=1 /usr/bin/docker build "$@"
    else
        DOCKER_BUILDKIT=1 docker build "$@"
    fi
}

if $binaries_only; then
    mode=prebuilt
elif [[ $mode == auto ]]; then
    if docker image inspect "$rust_image" >/dev/null 2>&1 || timeout 60 docker pull -q "$rust_image" >/dev/null 2>&1; then
        mode=docker
    else
        say "$rust_image cannot be pulled: building the static binaries on this host instead"
        mode=prebuilt
    fi
fi

case $mode in
docker)
    say "docker build (builder $rust_image) -> $tag"
    buildkit --target runtime -t "$tag" .
    ;;
prebuilt)
    arch=$(uname -m)
    triple=$arch-unknown-linux-gnu
    target_dir=${IMAGE_TARGET_DIR:-}
    if [[ -z $target_dir ]]; then
        if [[ -d /var/cache/message-dispatcher-test ]]; then
            target_dir=/var/cache/message-dispatcher-test/target
        else
            target_dir=target
        fi
    fi
    say "cargo build --release, static (glibc static-pie, $triple) in $target_dir"
    # An explicit --target keeps build scripts and proc macros dynamic; only the binaries
    # are linked statically.
    RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=$target_dir \
        cargo build --release --locked --target "$triple" --bins
    $binaries_only && exit 0
    context=$(mktemp -d)
    trap 'rm -rf "$context"' EXIT
    mkdir "$context/bin"
    for bin in message-dispatcher add-test-messages webhook-sink; do
        cp "$target_dir/$triple/release/$bin" "$context/bin/"
        if readelf -l "$context/bin/$bin" | grep -q 'Requesting program interpreter'; then
            echo "$bin is dynamically linked: it would not start on scratch" >&2
            exit 1
        fi
    done
    ca=/etc/ssl/certs/ca-certificates.crt
    [[ -s $ca ]] || { echo "$ca is missing (apt-get install ca-certificates)" >&2; exit 1; }
    cp "$ca" "$context/bin/ca-certificates.crt"
    say "docker build --build-arg BINARIES=prebuilt -> $tag"
    buildkit --target runtime --build-arg BINARIES=prebuilt -f Dockerfile -t "$tag" "$context"
    ;;
*)
    echo "IMAGE_BUILD must be auto, docker or prebuilt, not $mode" >&2
    exit 2
    ;;
esac

size=$(docker image inspect -f '{{.Size}}' "$tag")
say "$tag: $size bytes"
