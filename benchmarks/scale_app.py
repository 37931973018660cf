"""bench_scale's Celery app: a task that holds a worker thread for a while, then counts itself in Redis.

Configured by env like benchmarks/transport_app.py: BENCH_BROKER_URL, BENCH_COUNTER_URL,
BENCH_PREFIX, BENCH_PREFETCH.
"""
from __future__ import annotations

import os
import time

import redis
from celery import Celery

import etcd_broker  # noqa: F401

BROKER = os.environ.get("BENCH_BROKER_URL", "etcdv3://127.0.0.1:2379")
COUNTER = redis.Redis.from_url(os.environ.get("BENCH_COUNTER_URL", "redis://127.0.0.1:6379/15"))

app = Celery("bench-scale", broker=BROKER)
app.conf.update(
    broker_transport_options={"prefix": os.environ.get("BENCH_PREFIX", "/bench")},
    task_serializer="json", accept_content=["json"], task_ignore_result=True,
    worker_prefetch_multiplier=int(os.environ.get("BENCH_PREFETCH", "4")),
    broker_connection_retry_on_startup=True,
)


@app.task
def hold(run: str, milliseconds: float) -> None:
    """Sleep (as a GPU-bound task waits on its device, GIL released), then count."""
    if milliseconds:
        time.sleep(milliseconds / 1000)
    COUNTER.incr(run)
