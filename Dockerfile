# message-dispatcher container image.
#
#   docker build -t message-dispatcher .            (BuildKit: Docker 23+, or DOCKER_BUILDKIT=1)
#   scripts/image.sh [TAG]                          (the same image, also without registry access)
#   docker run --rm -e WEBHOOK_URL=... -e DATABASE_URL=... -p 8080:8080 message-dispatcher
#
# Two ways to the same runtime stage, chosen with --build-arg BINARIES=:
# - `build` (the default): `rust:1-alpine` compiles fully static musl binaries;
# - `prebuilt`: static binaries made elsewhere, given in the build context's bin/
#   directory with a CA bundle. scripts/image.sh takes this way where the Rust
#   image cannot be pulled (no registry), with glibc static-pie binaries built on
#   the host (`-C target-feature=+crt-static`); the test suite builds and runs it.
# Either way the final stage is `scratch` holding only those binaries and a CA
# bundle: no shell, libc, package manager or curl. The HEALTHCHECK therefore runs
# the daemon's own `healthcheck` subcommand (exec form), and the PostgreSQL
# migrations are compiled into the binary, so no sql/ directory is needed.
#
# Size: 11.8 MB measured (5.9 + 4.2 + 1.7 MB of binaries after `lto`,
# `codegen-units = 1`, `strip`, plus ~220 kB of CA certificates); the test suite
# fails above 15 MB.
#
# No `# syntax=` line: BuildKit would have to pull that frontend from a registry;
# the built-in one knows everything used here.

ARG RUST_VERSION=1
ARG BINARIES=build

# ---------------------------------------------------------------------------
# Builder: the official Rust image on Alpine. Alpine's toolchain targets musl,
# and Rust's *-unknown-linux-musl targets link statically (crt-static) by
# default, so the result runs on `scratch`. ring (rustls' crypto) needs a C
# compiler: gcc ships with the image, musl-dev provides the headers/crt files.
# ---------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-alpine AS build
RUN apk add --no-cache musl-dev binutils ca-certificates
WORKDIR /build

# Dependency caching: BuildKit cache mounts keep the cargo registry and the
# target/ directory between builds, so a source change recompiles only this
# crate, not the ~100 dependencies. (Cache mounts are not part of any layer;
# the binaries are therefore copied out to /out within the same RUN, which
# also refuses a dynamically linked binary: it would not start on scratch.)
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/build/target,sharing=locked \
    set -eu; \
    target="$(uname -m)-unknown-linux-musl"; \
    cargo build --release --locked --target "$target" --bins; \
    mkdir -p /out; \
    for bin in message-dispatcher add-test-messages webhook-sink; do \
        cp "target/$target/release/$bin" /out/; \
        if readelf -l "/out/$bin" | grep -q 'Requesting program interpreter'; then \
            echo "$bin is dynamically linked" >&2; exit 1; \
        fi; \
    done; \
    cp /etc/ssl/certs/ca-certificates.crt /out/; \
    ls -l /out

# ---------------------------------------------------------------------------
# Prebuilt: the context's bin/ holds the three static binaries and
# ca-certificates.crt (scripts/image.sh checks they are static before).
# ---------------------------------------------------------------------------
FROM scratch AS prebuilt
COPY bin/ /out/

# The binaries of the way chosen.
FROM ${BINARIES} AS binaries

# ---------------------------------------------------------------------------
# Runtime: nothing but the binaries and the CA bundle (for https webhooks; add
# a private CA with SSL_CERT_FILE).
# ---------------------------------------------------------------------------
FROM scratch AS runtime

LABEL org.opencontainers.image.title="message-dispatcher" \
      org.opencontainers.image.description="Delivers messages waiting in PostgreSQL to an HTTP webhook; a Redis lease picks the one instance that sends." \
      org.opencontainers.image.licenses="MIT"

COPY --from=binaries /out/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=binaries /out/message-dispatcher /app/message-dispatcher
COPY --from=binaries /out/add-test-messages /app/add-test-messages
COPY --from=binaries /out/webhook-sink /app/webhook-sink

# Numeric, so no /etc/passwd is needed; 65532 is the conventional "nonroot".
USER 65532:65532

EXPOSE 8080

# Exec form: there is no /bin/sh. `healthcheck live` GETs
# http://127.0.0.1:$SERVER_PORT/livez and exits 0 on 200, else 1: liveness, the
# process is working (its scheduler loop makes progress). Not /health: an
# orchestrator that restarts unhealthy containers (Swarm, autoheal) must not
# restart every instance while PostgreSQL or Redis is down.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/app/message-dispatcher", "healthcheck", "live"]

ENTRYPOINT ["/app/message-dispatcher"]
CMD ["serve"]
