"""A Celery app without a result backend: tasks leave marker keys in etcd that tests count.

Configured by env: ETCD_TEST_URL, ETCD_TEST_PREFIX, ETCD_TEST_LEASE_TTL.
"""
from __future__ import annotations

import json
import os
import socket
import time
import uuid

from celery import Celery

import etcd_broker  # noqa: F401
from etcd_broker.core.client import get_client

URL = os.environ.get("ETCD_TEST_URL", "etcdv3://127.0.0.1:2379")
PREFIX = os.environ.get("ETCD_TEST_PREFIX", "/deephardway-test")
LEASE_TTL = int(os.environ.get("ETCD_TEST_LEASE_TTL", "10"))

app = Celery("markers", broker=URL)
app.conf.update(
    broker_transport_options={"prefix": PREFIX, "lease_ttl": LEASE_TTL},
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,
    task_queue_max_priority=9,
)


def marker_prefix(name: str) -> str:
    return f"{PREFIX}/markers/{name}/"


def mark(name: str, **info) -> None:
    info.update(host=socket.gethostname(), pid=os.getpid(), at=time.time())
    get_client(URL).put(marker_prefix(name) + uuid.uuid4().hex, json.dumps(info))


@app.task
def record(name: str, value: int) -> None:
    mark(name, value=value)


@app.task(acks_late=True)
def slow(name: str, seconds: float) -> None:
    mark(name + "-started")
    time.sleep(seconds)
    mark(name + "-done")
