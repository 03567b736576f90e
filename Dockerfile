# syntax=docker/dockerfile:1
#
# message-dispatcher container image.
#
#   docker build -t message-dispatcher .
#   docker run --rm -e WEBHOOK_URL=... -e DATABASE_URL=... -p 8080:8080 message-dispatcher
#
# Stage 1 builds fully static musl binaries; stage 2 is `scratch` holding only
# those binaries and a CA bundle. There is no shell, libc, package manager or
# curl in the final image: the HEALTHCHECK therefore runs the daemon's own
# `healthcheck` subcommand (exec form), and the PostgreSQL migrations are
# compiled into the binary, so no sql/ directory is needed at run time.
#
# Expected size: each static binary is a few MB after `lto = true`,
# `codegen-units = 1` and `strip = true` (see [profile.release] in Cargo.toml),
# about 3-5 MB for message-dispatcher (rustls/ring, postgres, redis, tiny_http),
# less for add-test-messages and webhook-sink, plus ~220 kB of CA certificates.
# Target: the whole image stays at or under 15 MB (`docker image ls message-dispatcher`).

ARG RUST_VERSION=1

# ---------------------------------------------------------------------------
# Builder: the official Rust image on Alpine. Alpine's toolchain targets musl,
# and Rust's *-unknown-linux-musl targets link statically (crt-static) by
# default, so the result runs on `scratch`. ring (rustls' crypto) needs a C
# compiler: gcc ships with the image, musl-dev provides the headers/crt files.
# ---------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-alpine AS builder
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
    ls -l /out

# ---------------------------------------------------------------------------
# Runtime: nothing but the binaries and the CA bundle (for https webhooks).
# ---------------------------------------------------------------------------
FROM scratch

LABEL org.opencontainers.image.title="message-dispatcher" \
      org.opencontainers.image.description="Delivers messages waiting in PostgreSQL to an HTTP webhook; a Redis lease picks the one instance that sends." \
      org.opencontainers.image.licenses="MIT"

COPY --from=builder /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=builder /out/message-dispatcher /app/message-dispatcher
COPY --from=builder /out/add-test-messages /app/add-test-messages
COPY --from=builder /out/webhook-sink /app/webhook-sink

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
