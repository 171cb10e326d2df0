# syntax=docker/dockerfile:1
#
# Container image of the dns-sidecar.
#
#   docker build -t dns-sidecar:0.1.0 .
#   docker run --rm -p 5353:5353/udp -p 5353:5353/tcp -p 8053:8053 \
#       -e DNS_SIDECAR_UPSTREAM=1.1.1.1,9.9.9.9 -e DNS_SIDECAR_ALLOW=172.16.0.0/12 \
#       dns-sidecar:0.1.0
#
# All configuration is through DNS_SIDECAR_<FLAG> environment variables (one per flag, see
# the flag table in README.md); arguments after the image name are passed to dns-sidecar and
# win over the environment. Needs BuildKit (the default builder since Docker 23) for the
# RUN --mount below. tests/test_deploy.py checks this file against the CLI's real defaults.

ARG PYTHON_VERSION=3.11

# ---------------------------------------------------------------------------------------
# Stage 1: build the wheel of this project (nothing else; dependencies are binary wheels).
# The wheel carries the compiled UDP fast path (sidecar/dns/_fastudp.c), so this stage, and
# only this one, has a C compiler; the image refuses to build if the extension did not
# compile (setup.py marks it optional, which would otherwise leave a pure-Python wheel).
FROM python:${PYTHON_VERSION}-slim-bookworm AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY sidecar/ sidecar/
COPY client/ client/
RUN python -m pip wheel --no-deps --wheel-dir /dist . \
    && python -m zipfile -l /dist/dns_sidecar-*.whl | grep -q "sidecar/dns/_fastudp[^ ]*\.so"

# ---------------------------------------------------------------------------------------
# Stage 2: a clean runtime with only the installed wheel, with the `fast` extra (uvloop) and
# the `shared` extra (redis-py and its hiredis parser, for --shared-cache).
# No compilers: dependencies must come as binary wheels (--only-binary), which they do for
# linux/amd64 and linux/arm64.
FROM python:${PYTHON_VERSION}-slim-bookworm

LABEL org.opencontainers.image.title="dns-sidecar" \
      org.opencontainers.image.description="Caching DNS sidecar for crawlers (DNS on 5353 UDP/TCP, health and stats API on 8053)" \
      org.opencontainers.image.licenses="MIT"

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# The wheel is bind-mounted from the build stage, so it never becomes a layer of this image.
RUN --mount=type=bind,from=build,source=/dist,target=/dist \
    set -eu; \
    wheel="$(echo /dist/dns_sidecar-*.whl)"; \
    python -m pip install --only-binary=:all: "${wheel}[fast,shared]"; \
    dns-sidecar --help >/dev/null

# A numeric, non-root user: Kubernetes can only verify `runAsNonRoot` for a numeric USER.
RUN groupadd --system --gid 10001 dns-sidecar \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin dns-sidecar
USER 10001:10001

# Inside a container the sidecar must listen on all interfaces to be reachable at all
# (published ports, kubelet probes on the pod IP). Who may query is still --allow, which
# defaults to loopback only: set DNS_SIDECAR_ALLOW for clients outside the container.
ENV DNS_SIDECAR_LISTEN=0.0.0.0:5353 \
    DNS_SIDECAR_HTTP=0.0.0.0:8053

# DNS (unprivileged port, UDP and TCP) and the health / stats / metrics API.
EXPOSE 5353/udp 5353/tcp 8053/tcp

# No curl in the image: the standard library asks /healthz on whatever DNS_SIDECAR_HTTP
# says at run time (a wildcard address becomes loopback; with the API off there is nothing
# to ask). Proxies from the environment are ignored on purpose.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os,sys,urllib.request as u;a=os.environ.get('DNS_SIDECAR_HTTP','127.0.0.1:8053').strip().replace('0.0.0.0','127.0.0.1').replace('[::]','[::1]');sys.exit(a.lower()!='off' and u.build_opener(u.ProxyHandler({})).open('http://'+a+'/healthz',timeout=2).status!=200)"]

# SIGTERM is a clean shutdown (exit 0), after --lameduck seconds of reporting not-ready.
STOPSIGNAL SIGTERM
ENTRYPOINT ["dns-sidecar"]
