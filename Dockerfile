# pgmq-dispatcher as a container: a build stage with the -dev packages, and a
# slim runtime stage with only the shared libraries, tini and CA certificates.
#
#   docker build -t pgmq-dispatcher .
#   docker run --rm --read-only --cap-drop=ALL --security-opt no-new-privileges \
#     -e PGMQD_QUEUE_NAME=video_audio_transcription -e RUNPOD_ENDPOINT_ID=... \
#     -e RUNPOD_API_KEY_FILE=/run/secrets/runpod_api_key -e DATABASE_URL_FILE=/run/secrets/database_url \
#     -v "$PWD/secrets:/run/secrets:ro" pgmq-dispatcher
#
# Configured from the environment alone (PGMQD_<SECTION>_<KEY>, RUNPOD_*,
# DATABASE_URL, *_FILE for secrets); no configuration file is needed. See
# docs/operations.md and docs/docker-compose.example.yml. Pin the base image
# by digest (debian:bookworm-slim@sha256:...) for reproducible builds.

FROM debian:bookworm-slim AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential pkg-config \
      libev-dev libpq-dev libcurl4-openssl-dev libcjson-dev libinih-dev \
      libsystemd-dev libmicrohttpd-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Makefile ./
COPY include/ include/
COPY src/ src/
RUN make -j"$(nproc)" && strip build/pgmq-dispatcher && ./build/pgmq-dispatcher --version

FROM debian:bookworm-slim
# Only the shared libraries, tini and CA certificates: no documentation, man
# pages or translations (dpkg path-exclude), no apt lists or package caches
# left in the layer (apt's pkgcache.bin/srcpkgcache.bin alone are ~60 MB).
RUN printf '%s\n' 'path-exclude=/usr/share/doc/*' 'path-include=/usr/share/doc/*/copyright' \
      'path-exclude=/usr/share/man/*' 'path-exclude=/usr/share/locale/*' \
      'path-exclude=/usr/share/lintian/*' > /etc/dpkg/dpkg.cfg.d/pgmq-dispatcher-slim \
 && apt-get update \
 && apt-get install -y --no-install-recommends \
      libev4 libpq5 libcurl4 libcjson1 libinih1 libsystemd0 libmicrohttpd12 \
      ca-certificates tini \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
      /var/cache/debconf/*-old /var/lib/dpkg/*-old \
 && groupadd --system --gid 10001 pgmqd \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin pgmqd
COPY --from=build /src/build/pgmq-dispatcher /usr/local/bin/pgmq-dispatcher
# The daemon writes nothing to disk: it runs with a read-only root file system
# and no capabilities. Logs are one line per event on stderr.
USER 10001:10001
# SIGTERM drains in-flight requests for daemon.shutdown_timeout_ms (8 s by
# default); give `docker stop` more than that (docker stop -t 15,
# compose stop_grace_period: 15s).
STOPSIGNAL SIGTERM
# tini as PID 1 forwards signals and reaps; exec form so that no shell sits
# in between.
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/pgmq-dispatcher"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/pgmq-dispatcher", "--health-check"]
