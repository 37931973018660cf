"""etcd v3 for Celery: a kombu transport and a push-based result backend.

Importing this package registers the ``etcdv3://`` scheme with kombu (broker), so
``Connection("etcdv3://host:2379")`` just works; it imports no Celery (kombu-only users
need none). Celery finds the result backend (``result_backend = "etcdv3://host:2379"``)
by the distribution's ``celery.result_backends`` entry point; when Celery was imported
first, the alias is also registered here (for a source checkout with nothing installed).

The public names (``__all__``) are loaded on first use: ``etcd_broker.Transport``,
``etcd_broker.EtcdBackend``... Those that need Celery import it then, not before.

Layout (docs/transport.md, "Layout: which file owns what"; each subpackage's docstring is its map):
:mod:`etcd_broker.core` (keys, transactions, client, watch hub, fork safety: what both sides share),
:mod:`etcd_broker.transport` (the kombu transport), :mod:`etcd_broker.backend` (the Celery result
backend); at the top level :mod:`~etcd_broker.exceptions` (every exception users catch),
:mod:`~etcd_broker.compat` (private upstream names), :mod:`~etcd_broker.stats` and
:mod:`~etcd_broker.flower` (operators), :mod:`~etcd_broker.batches`, :mod:`~etcd_broker.pool_health`.

Fork safety needs no setting: gRPC's defaults plus :mod:`etcd_broker.core.client`. The
two gRPC variables people set for fork support make it worse here, so we warn.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

from kombu.transport import TRANSPORT_ALIASES

__version__ = "0.1.0"

logger = logging.getLogger(__name__)

#: The URL scheme for the broker and the result backend.
SCHEME = "etcdv3"
#: gRPC settings measured to break forked children with this library (docs/transport.md, Fork safety).
UNSAFE_GRPC_ENV = {
    "GRPC_ENABLE_FORK_SUPPORT": "1/true hung fork() while watch streams were open; 0/false left children unable to connect",
    "GRPC_POLL_STRATEGY": "poll aborted forked children ('FD from fork parent still in poll list')",
}
#: The public API: name -> module that defines it (imported on first access).
_PUBLIC = {
    "Transport": "etcd_broker.transport.channel",
    "EtcdBackend": "etcd_broker.backend.result_backend",
    "BatchTask": "etcd_broker.batches",
    "watch_task": "etcd_broker.backend.result_backend",
    "follow_task": "etcd_broker.backend.result_backend",
    "queue_stats": "etcd_broker.stats",
    "live_consumers": "etcd_broker.stats",
    "stats_for_connection": "etcd_broker.stats",
    "EtcdConfigError": "etcd_broker.exceptions",
    "EtcdUnreachable": "etcd_broker.exceptions",
    "EtcdNoSpace": "etcd_broker.exceptions",
    "MessageTooLarge": "etcd_broker.exceptions",
    "QueueArgumentError": "etcd_broker.exceptions",
    "QueueFull": "etcd_broker.exceptions",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:
    """Load a public name from its module on first use (PEP 562)."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'etcd_broker' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


TRANSPORT_ALIASES.setdefault(SCHEME, "etcd_broker.transport:Transport")
if "celery.app.backends" in sys.modules:  # else the entry point does it, without importing Celery here
    sys.modules["celery.app.backends"].BACKEND_ALIASES.setdefault(SCHEME, "etcd_broker.backend:EtcdBackend")

for _name, _why in UNSAFE_GRPC_ENV.items():
    if os.environ.get(_name):
        logger.warning("etcd_broker: %s=%s is set; unset it for fork safety (%s)", _name, os.environ[_name], _why)

importlib.import_module("etcd_broker.core.client")  # installs the fork handlers before any client exists

# pool_health (a worker whose pool cannot start children says so) and transport.consumer (its
# executing section: pool children report the tasks they run) hook Celery signals, worker_init among
# them: only where Celery is loaded already, as in every worker (`celery -A proj worker` imports
# Celery before the app module that imports us); kombu-only users import no Celery.
if "celery" in sys.modules:
    from etcd_broker import pool_health  # noqa: F401
    from etcd_broker.transport import consumer  # noqa: F401
