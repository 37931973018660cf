"""etcd v3 for Celery: a kombu transport and a push-based result backend.

Importing this package registers the ``etcdv3://`` scheme with kombu (broker)
and with Celery (result backend), so ``Connection("etcdv3://host:2379")`` and
``result_backend = "etcdv3://host:2379"`` just work.
"""
from __future__ import annotations

from celery.app.backends import BACKEND_ALIASES
from kombu.transport import TRANSPORT_ALIASES

TRANSPORT_ALIASES.setdefault("etcdv3", "etcd_broker.transport:Transport")
BACKEND_ALIASES.setdefault("etcdv3", "etcd_broker.backend:EtcdBackend")

