"""A Celery app for busy-worker tests: etcd broker and result backend, tasks that hold a pool slot.

The worker reads ETCD_TEST_URL, ETCD_TEST_PREFIX and ETCD_TEST_LEASE_TTL; a test builds its
own client app with :func:`make_app` and sends these tasks by name.
"""
from __future__ import annotations

import json
import os
import time

from celery import Celery

import etcd_broker  # noqa: F401 - registers etcdv3://
from etcd_broker.core.client import get_client
from tests.transport.marker_app import mark

URL = os.environ.get("ETCD_TEST_URL", "etcdv3://127.0.0.1:2379")
PREFIX = os.environ.get("ETCD_TEST_PREFIX", "/deephardway-test")
LEASE_TTL = int(os.environ.get("ETCD_TEST_LEASE_TTL", "10"))


def make_app(url: str, prefix: str, lease_ttl: int = LEASE_TTL) -> Celery:
    """The app as a worker or a client process configures it."""
    app = Celery("busy", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        broker_transport_options={"prefix": prefix, "lease_ttl": lease_ttl},
        result_backend_transport_options={"prefix": prefix},
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=1,
        broker_connection_retry_on_startup=True,
        task_queue_max_priority=9,
    )
    return app


def client_app(url: str, prefix: str, lease_ttl: int = LEASE_TTL) -> Celery:
    """:func:`make_app` for a test's client side, plus ``app.markers(name)``: the marker rows the
    tasks wrote under ``name``, oldest first."""
    app = make_app(url, prefix, lease_ttl)
    client = get_client(url)

    def markers(name: str) -> list[dict]:
        rows = [(meta.create_revision, json.loads(value))
                for value, meta in client.get_prefix(f"{prefix}/markers/{name}/")]
        return [info for _, info in sorted(rows, key=lambda row: row[0])]

    app.markers = markers
    return app


app = make_app(URL, PREFIX)


@app.task(bind=True, acks_late=True, name="busy.hold")
def hold(self, name: str, seconds: float) -> int:
    """Mark ``<name>-started`` (with the task id), hold a slot for ``seconds``, mark ``<name>-done``."""
    mark(name + "-started", task_id=self.request.id)
    time.sleep(seconds)
    mark(name + "-done", task_id=self.request.id)
    return os.getpid()


@app.task(acks_late=True, ignore_result=True, name="busy.nap")
def nap(seconds: float) -> int:
    """Hold a slot without touching etcd (for tests that make etcd unreachable meanwhile)."""
    time.sleep(seconds)
    return os.getpid()


@app.task(bind=True, name="busy.steps")
def steps(self, count: int, delay: float) -> int:
    """Report PROGRESS after each step; return the pid that ran it."""
    for step in range(1, count + 1):
        time.sleep(delay)
        self.update_state(state="PROGRESS", meta={"progress": 100 * step // count})
    return os.getpid()


@app.task(name="busy.pid")
def pid() -> int:
    return os.getpid()
