"""etcd v3 for Celery: a kombu transport and a push-based result backend.

Importing this package registers the ``etcdv3://`` scheme with kombu (broker)
and with Celery (result backend), so ``Connection("etcdv3://host:2379")`` and
``result_backend = "etcdv3://host:2379"`` just work (the package's entry points
do the same for an installed distribution).

Fork safety needs no setting: gRPC's defaults plus :mod:`etcd_broker.forking`. The
two gRPC variables people set for fork support make it worse here, so we warn.
"""
from __future__ import annotations

import logging
import os

from celery.app.backends import BACKEND_ALIASES
from kombu.transport import TRANSPORT_ALIASES

logger = logging.getLogger(__name__)

#: gRPC settings measured to break forked children with this library (docs/transport.md, Fork safety).
UNSAFE_GRPC_ENV = {
    "GRPC_ENABLE_FORK_SUPPORT": "1/true hung fork() while watch streams were open; 0/false left children unable to connect",
    "GRPC_POLL_STRATEGY": "poll aborted forked children ('FD from fork parent still in poll list')",
}

TRANSPORT_ALIASES.setdefault("etcdv3", "etcd_broker.transport:Transport")
BACKEND_ALIASES.setdefault("etcdv3", "etcd_broker.backend:EtcdBackend")

for _name, _why in UNSAFE_GRPC_ENV.items():
    if os.environ.get(_name):
        logger.warning("etcd_broker: %s=%s is set; unset it for fork safety (%s)", _name, os.environ[_name], _why)

# forking installs the fork handlers before any client exists; pool_health: a worker whose pool
# cannot start children says so.
from etcd_broker import forking, pool_health  # noqa: E402,F401
