"""The Celery app bench_operators.py runs on etcd and on Redis: the same tasks, either broker.

Configured by env: BENCH_OPS_URL (``etcdv3://...`` or ``redis://...``, broker and result
backend alike), BENCH_OPS_PREFIX and BENCH_OPS_LEASE_TTL (etcd only).
"""
from __future__ import annotations

import os
import time

from celery import Celery

import etcd_broker  # noqa: F401 - registers etcdv3://

URL = os.environ.get("BENCH_OPS_URL", "etcdv3://127.0.0.1:2379")
PREFIX = os.environ.get("BENCH_OPS_PREFIX", "/bench-ops")
LEASE_TTL = int(os.environ.get("BENCH_OPS_LEASE_TTL", "10"))


def make_app(url: str = URL, prefix: str = PREFIX, lease_ttl: int = LEASE_TTL) -> Celery:
    app = Celery("operators", broker=url, backend=url, set_as_current=False)
    options = {"prefix": prefix, "lease_ttl": lease_ttl} if url.startswith("etcd") else {}
    app.conf.update(
        broker_transport_options=options,
        result_backend_transport_options={"prefix": prefix} if options else {},
        task_serializer="json", result_serializer="json", accept_content=["json"],
        worker_prefetch_multiplier=1, broker_connection_retry_on_startup=True,
    )
    return app


app = make_app()


@app.task(acks_late=True, name="ops.hold")
def hold(seconds: float) -> int:
    """Hold a pool slot."""
    time.sleep(seconds)
    return os.getpid()


@app.task(acks_late=True, ignore_result=True, name="ops.nap")
def nap(seconds: float) -> int:
    """Hold a slot, store nothing (the broker may be unreachable when it ends)."""
    time.sleep(seconds)
    return os.getpid()
