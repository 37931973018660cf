"""The Celery app bench_delayed.py runs on etcd, Redis and RabbitMQ: one ETA task that logs its run.

Configured by env: BENCH_DELAYED_URL (broker), BENCH_DELAYED_PREFIX (etcd only),
BENCH_DELAYED_LOG (a file each run appends ``<index> <due> <started at> <pid>`` to as it starts:
one short O_APPEND write, atomic across threads and pool processes, no broker involved),
BENCH_DELAYED_QUORUM=1 (RabbitMQ quorum queues: kombu's native delayed delivery) and
BENCH_DELAYED_OPTIONS (JSON transport options added to the broker's: ``lease_ttl``, ``visibility_timeout``).
"""
from __future__ import annotations

import json
import os
import time

from celery import Celery

import etcd_broker  # noqa: F401 - registers etcdv3://

URL = os.environ.get("BENCH_DELAYED_URL", "etcdv3://127.0.0.1:2379")
PREFIX = os.environ.get("BENCH_DELAYED_PREFIX", "/bench-delayed")
LOG = os.environ.get("BENCH_DELAYED_LOG", "/tmp/bench-delayed.log")
QUORUM = os.environ.get("BENCH_DELAYED_QUORUM") == "1"
OPTIONS = json.loads(os.environ.get("BENCH_DELAYED_OPTIONS") or "{}")


def make_app(url: str = URL, prefix: str = PREFIX, quorum: bool = QUORUM, options: dict | None = None) -> Celery:
    app = Celery("delayed", broker=url, set_as_current=False)
    options = OPTIONS if options is None else options
    app.conf.update(
        broker_transport_options={"prefix": prefix, **options} if url.startswith("etcd") else dict(options),
        task_serializer="json", accept_content=["json"], task_ignore_result=True, task_acks_late=True,
        worker_prefetch_multiplier=1, broker_connection_retry_on_startup=True,
    )
    if quorum:
        app.conf.update(task_default_queue_type="quorum",
                        broker_transport_options={"confirm_publish": True, **options})
    return app


app = make_app()


@app.task(name="delayed.run")
def run(index: int, due: float, seconds: float = 0.0) -> None:
    """Log the start, then take ``seconds`` (a long task)."""
    line = f"{index} {due:.6f} {time.time():.6f} {os.getpid()}\n".encode()
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    time.sleep(seconds)
