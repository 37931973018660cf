"""bench_roundtrip's Celery app: broker and result backend on one etcd (BENCH_BROKER_URL), one echo task."""
from __future__ import annotations

import os

from celery import Celery

import etcd_broker  # noqa: F401 - registers the etcdv3:// transport and result backend

URL = os.environ.get("BENCH_BROKER_URL", "etcdv3://127.0.0.1:2379")
OPTIONS = {"prefix": os.environ.get("BENCH_PREFIX", "/roundtrip")}

app = Celery("roundtrip", broker=URL, backend=URL)
app.conf.update(
    broker_transport_options=OPTIONS, result_backend_transport_options=OPTIONS,
    task_serializer="json", accept_content=["json"], result_serializer="json",
    worker_prefetch_multiplier=1, broker_connection_retry_on_startup=True,
    # the site's settings (deephardway_site/settings.py): STARTED states, extended results, priorities 0-9
    task_track_started=True, result_extended=True, task_queue_max_priority=9, task_default_priority=5,
)


@app.task
def echo(value: int) -> int:
    return value
