# Stand-ins for the public postgres and redis images, for the Compose test on a
# machine that cannot pull from a registry: Debian's own packages on the
# debootstrapped base image the systemd test uses (tests/containers/setup.sh
# builds both). They follow the official images' interface as far as the
# compose files use it: POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB, the data
# in /var/lib/postgresql/data, pg_isready and redis-cli on PATH, `redis-server`
# as the command; PGPORT is honoured as by the official image.
ARG BASE=message-dispatcher-test/systemd:bookworm
FROM ${BASE} AS base
# policy-rc.d: the packages' maintainer scripts must not start the servers at
# build time (the build shares the host's network).
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d \
 && apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      postgresql-15 redis-server >/dev/null \
 && rm -rf /var/lib/apt/lists/* \
 && rm -f /usr/sbin/policy-rc.d

FROM base AS postgres
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["postgres"]

FROM base AS redis
USER redis
CMD ["redis-server", "--save", "", "--appendonly", "no"]
