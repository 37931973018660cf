"""The benchmarks' Celery app: broker from BENCH_BROKER_URL; tasks count into a Redis counter."""
from __future__ import annotations

import os
import time

import redis
from celery import Celery

import etcd_broker  # noqa: F401

BROKER = os.environ.get("BENCH_BROKER_URL", "etcdv3://127.0.0.1:2379")
COUNTER = redis.Redis.from_url(os.environ.get("BENCH_COUNTER_URL", "redis://127.0.0.1:6379/15"))

app = Celery("bench", broker=BROKER)
app.conf.update(
    broker_transport_options={"prefix": os.environ.get("BENCH_PREFIX", "/bench")},
    task_serializer="json", accept_content=["json"], task_ignore_result=True,
    worker_prefetch_multiplier=int(os.environ.get("BENCH_PREFETCH", "4")),
    broker_connection_retry_on_startup=True,
)


@app.task
def noop(run: str) -> None:
    COUNTER.incr(run)


@app.task
def stamp(run: str, sent_at: float) -> None:
    COUNTER.rpush(run, time.time() - sent_at)


@app.task
def hold(run: str, milliseconds: float) -> None:
    """Sleep (as a GPU-bound task waits on its device, GIL released), then count (bench_scale)."""
    if milliseconds:
        time.sleep(milliseconds / 1000)
    COUNTER.incr(run)
