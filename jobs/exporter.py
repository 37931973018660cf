"""Serving Prometheus metrics from a process that is not the web: the Celery worker's and
``watch_jobs``' own ``/metrics``. Django-free (the worker side imports it without settings).

With ``PROMETHEUS_MULTIPROC_DIR`` set, what is served is every process's samples in that
directory (prefork children, gunicorn workers); otherwise this process's.
"""
from __future__ import annotations

import logging
import os

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

logger = logging.getLogger(__name__)

#: Environment variable that turns on prometheus-client's multiprocess mode (a directory).
MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
#: Address an exporter binds unless told otherwise: Prometheus scrapes from another host.
DEFAULT_ADDR = "0.0.0.0"


def recorded_registry() -> CollectorRegistry:
    """What this process recorded, or every process's in multiprocess mode."""
    directory = os.environ.get(MULTIPROC_VARIABLE)
    if not directory:
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    return registry


def port_from_env(variable: str) -> int | None:
    """The port in ``variable``; None when unset; ValueError naming it when not a port."""
    value = os.environ.get(variable, "").strip()
    if not value:
        return None
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise ValueError(f"{variable}={value!r} is not a TCP port (1-65535)")
    return int(value)


def serve(port: int, addr: str = DEFAULT_ADDR, variable: str = "port") -> str:
    """Serve ``recorded_registry()`` on ``addr:port`` in a daemon thread; returns its URL.
    OSError (port taken) becomes a message naming ``variable``."""
    try:
        start_http_server(port, addr=addr, registry=recorded_registry())
    except OSError as exc:
        raise OSError(f"{variable}={port}: cannot serve metrics on {addr}:{port}: {exc}") from None
    url = f"http://{addr}:{port}/metrics"
    logger.info("metrics on %s", url)
    return url
