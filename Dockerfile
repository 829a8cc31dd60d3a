# Bastion in one image: nginx (+ njs for token metering), the Python app in a virtual environment (gate,
# manager, certbot) and tini as PID 1. See docs/deploy.md.
#
#   docker build -t bastion .                       (podman build works the same)
#   docker build --build-arg BASE=debian:bookworm-slim .   any Debian 12 base; Python comes from apt if missing
#
# Needs BuildKit (RUN --mount; the default builder of Docker 23+) or podman/buildah. Behind a TLS-intercepting
# proxy, hand pip its CA bundle as a build secret (never stored in a layer):
#   docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt .
ARG BASE=python:3.11-slim

# ---------------------------------------------------------------------------------------------------- build
FROM ${BASE} AS build
ENV DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
# a base without Python (plain Debian): Debian's python3 (3.11 on bookworm) with venv support
RUN if ! python3 -m venv /tmp/probe >/dev/null 2>&1; then \
        apt-get update -q && apt-get install -y -q --no-install-recommends python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi; rm -rf /tmp/probe
# dependencies first (their layer survives code changes), from pyproject.toml's own list
COPY pyproject.toml /src/
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    python3 -m venv /opt/bastion \
    && python3 -c 'import tomllib; print("\n".join(tomllib.load(open("/src/pyproject.toml", "rb"))["project"]["dependencies"]))' \
       > /tmp/requirements.txt \
    && /opt/bastion/bin/pip install -q -r /tmp/requirements.txt
# the project itself, a regular (not editable) install
COPY README.md /src/
COPY manager /src/manager
COPY authsvc /src/authsvc
COPY nginx_templates /src/nginx_templates
COPY frontend /src/frontend
RUN --mount=type=secret,id=ca \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    /opt/bastion/bin/pip install -q --no-deps /src \
    && /opt/bastion/bin/pip uninstall -q -y pip

# ---------------------------------------------------------------------------------------------------- final
FROM ${BASE}
ENV DEBIAN_FRONTEND=noninteractive
# nginx + njs from Debian, tini to reap orphans and pass signals on; python3 only when the base lacks it
RUN packages="nginx libnginx-mod-http-js tini ca-certificates"; \
    command -v python3 >/dev/null || packages="$packages python3"; \
    apt-get update -q && apt-get install -y -q --no-install-recommends $packages \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log \
    && useradd --uid 10001 --user-group --no-create-home --home-dir /data --shell /usr/sbin/nologin bastion \
    && install -d -o bastion -g bastion -m 0711 /data \
    && ln -sf /dev/stderr /var/log/nginx/error.log
COPY --from=build /opt/bastion /opt/bastion

# Everything lives in /data; the listeners are high ports so nothing runs as root (publish 80/443 onto
# 8880/8443 for ACME and HTTPS, see docs/deploy.md). Set BASTION_ADMIN_PASSWORD(_FILE) before the first start.
ENV PATH=/opt/bastion/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    BASTION_DATA_DIR=/data \
    BASTION_PUBLIC_LISTEN=0.0.0.0:8080 \
    BASTION_ADMIN_LISTEN=0.0.0.0:8081 \
    BASTION_HTTP_LISTEN=0.0.0.0:8880 \
    BASTION_HTTPS_LISTEN=0.0.0.0:8443 \
    BASTION_HTTPS_PUBLIC_PORT=443 \
    BASTION_STOP_TIMEOUT=6
VOLUME /data
EXPOSE 8080 8081 8880 8443
USER bastion
WORKDIR /data
# `bastion up` stops every child on SIGTERM: nginx gracefully (streams in flight get BASTION_STOP_TIMEOUT, 6 s,
# so a 10 s `docker stop` still ends with exit code 0), then the gate and the manager
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 CMD ["bastion", "healthcheck"]
ENTRYPOINT ["/usr/bin/tini", "--", "bastion"]
CMD ["up"]
