#!/usr/bin/env bash
# Builds the Debian package with cargo-deb, from static binaries (glibc static-pie, as the
# image's prebuilt way), so it depends on nothing and installs on any amd64 Debian or Ubuntu.
#
#   scripts/deb.sh [OUTPUT_DIR]      (default target/debian); prints the .deb's path last
#
# cargo-deb is used from PATH, or installed once with `cargo install` into the test cache
# (tests/containers/setup.sh cargo-deb). IMAGE_TARGET_DIR as for scripts/image.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
# Run from `cargo test`, the environment carries the test's CARGO_MANIFEST_DIR & co; some build
# scripts (ring's) track them, and the release build would start over each time.
while read -r var; do unset "$var"; done < <(compgen -e | grep -E '^CARGO_' | grep -vxE 'CARGO_HOME|CARGO_TARGET_DIR')

out=${1:-target/debian}
triple=$(uname -m)-unknown-linux-gnu
target_dir=${IMAGE_TARGET_DIR:-}
if [[ -z $target_dir ]]; then
    if [[ -d /var/cache/message-dispatcher-test ]]; then
        target_dir=/var/cache/message-dispatcher-test/target
    else
        target_dir=target
    fi
fi

if command -v cargo-deb >/dev/null; then
    cargo_deb=cargo-deb
else
    cargo_deb=$(tests/containers/setup.sh cargo-deb)/cargo-deb
fi

echo "==> cargo build --release, static (glibc static-pie, $triple) in $target_dir" >&2
RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=$target_dir \
    cargo build --release --locked --target "$triple" --bins
mkdir -p "$out"
echo "==> cargo deb -> $out" >&2
CARGO_TARGET_DIR=$target_dir "$cargo_deb" --no-build --target "$triple" --output "$out"
