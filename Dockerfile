# syntax=docker/dockerfile:1
# The Cards QR encryption gateway as a container image. From the repository root:
#
#   docker build -t cards-qr-gateway:0.1.0 .
#
# It expects what Kubernetes gives it (k8s/README.md): the configuration at
# /etc/gateway/config.yaml, keys and certificates mounted read-only where the configuration names
# them, and one writable directory (an emptyDir or tmpfs) at /tmp for the GnuPG homes
# (runtime_dir) and temp files; the root filesystem can then be read-only. By hand:
#
#   docker run --rm --read-only --tmpfs /tmp:rw,nosuid,nodev,size=64m \
#     -v "$PWD/deploy/etc-gateway:/etc/gateway:ro" -v "$PWD/deploy/keys:/etc/gateway-keys:ro" \
#     -v "$PWD/deploy/tls:/etc/gateway-tls:ro" -p 8443:8443 cards-qr-gateway:0.1.0
#
# No key, passphrase or certificate is in the image: .dockerignore admits only the package.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway/ gateway/
# A venv that the runtime stage copies whole; pip compiles the bytecode here, because the
# runtime's root filesystem is read-only.
RUN python -m venv /opt/gateway \
    && /opt/gateway/bin/pip install --no-cache-dir . \
    && /opt/gateway/bin/python -c "import gateway.app, gnupg, jwcrypto"

FROM ${PYTHON_IMAGE} AS runtime
# gpg and gpg-agent (with gpgconf and gpg-preset-passphrase) for the PGP envelope. tini runs as
# PID 1: it forwards SIGTERM (drain) and SIGHUP (reload) to python alone, not to its process
# group, so gpg calls in flight finish, and it reaps the gpg-agents that daemonize and are
# reparented to PID 1 when a reload or the exit stops them. Debian's security updates replace
# package versions, so they are not pinned (DL3008); rebuild the image to pick them up.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gpg gpg-agent tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid gateway --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin gateway
COPY --from=build /opt/gateway /opt/gateway

ENV PATH=/opt/gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/nonexistent \
    TMPDIR=/tmp \
    GATEWAY_HEALTHZ_URL=http://127.0.0.1:9090/healthz

LABEL org.opencontainers.image.title="cards-qr-gateway" \
      org.opencontainers.image.description="Encryption gateway (PGP or JWS+JWE) in front of Google's Cards QR API"

WORKDIR /
# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
# 8443: inbound TLS from Google. 9090: admin (/healthz, /readyz, /status, /metrics), only when
# the configuration's admin.listen is 0.0.0.0:9090 (its default is 127.0.0.1:9090).
EXPOSE 8443 9090

# Only for `docker run` (Kubernetes ignores it and uses the probes); set GATEWAY_HEALTHZ_URL when
# admin.listen is not port 9090.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['GATEWAY_HEALTHZ_URL'], timeout=4)"]

ENTRYPOINT ["/usr/bin/tini", "--", "python", "-m", "gateway"]
CMD ["run", "--config", "/etc/gateway/config.yaml"]
