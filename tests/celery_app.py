"""A Django-free Celery app for transport and result-backend tests.

Configured from the environment so a worker subprocess and the test agree:
``ETCD_TEST_URL`` (broker and backend) and ``ETCD_TEST_PREFIX`` (key prefix).
"""
from __future__ import annotations

import os
import time

from celery import Celery

import etcd_broker  # noqa: F401 - registers etcdv3://
from etcd_broker.batches import BatchTask
from etcd_broker.core.ops import MAX_PRIORITY

URL = os.environ.get("ETCD_TEST_URL", "etcdv3://127.0.0.1:2379")
PREFIX = os.environ.get("ETCD_TEST_PREFIX", "/deephardway-test")

#: ``reconcile_seconds`` for the worker's transport (tests of etcd_broker/transport/consumer.py), if set.
RECONCILE = {"reconcile_seconds": float(os.environ["ETCD_TEST_RECONCILE_SECONDS"])} \
    if os.environ.get("ETCD_TEST_RECONCILE_SECONDS") else {}

app = Celery("tests", broker=URL, backend=URL)
app.conf.update(
    broker_transport_options={"prefix": PREFIX, **RECONCILE},
    result_backend_transport_options={"prefix": PREFIX},
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    task_queue_max_priority=MAX_PRIORITY,
)


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def noop() -> None:
    return None


@app.task(acks_late=True)
def sleep_then_record(seconds: float, marker: str) -> str:
    """Sleep, then return the marker (acks_late: survives a worker kill)."""
    time.sleep(seconds)
    return marker


@app.task(acks_late=True)
def mark_run(marker: str, seconds: float = 0.0) -> str:
    """Sleep, then leave one key per run under <prefix>/runs/<marker>/ (runs are counted; acks_late)."""
    import uuid

    from etcd_broker.core.client import get_client

    time.sleep(seconds)
    get_client(URL).put(f"{PREFIX}/runs/{marker}/{uuid.uuid4().hex}", str(os.getpid()))
    return marker


@app.task
def fail(message: str) -> None:
    raise ValueError(message)


# --- result backend tests (tests/backend/) -------------------------------------------

@app.task(bind=True)
def count_with_progress(self, steps: int, delay: float) -> int:
    """Report PROGRESS after each step (progress 0-100), return the number of steps."""
    for step in range(1, steps + 1):
        time.sleep(delay)
        self.update_state(state="PROGRESS", meta={"progress": 100 * step // steps, "step": step})
    return steps


@app.task
def chord_total(values: list[int], marker: str) -> int:
    """A chord callback that leaves one put per run under <prefix>/markers/<marker>."""
    from etcd_broker.core.client import get_client

    get_client(URL).put(f"{PREFIX}/markers/{marker}", str(sum(values)))
    return sum(values)


@app.task
def fail_with(exc_type: str, message: str) -> None:
    """Raise a builtin exception of the given type (KeyError, RuntimeError, ...)."""
    import builtins

    raise getattr(builtins, exc_type)(message)


# --- batched tasks (tests/backend/test_batches.py) -------------------------------------

#: A ``double`` argument that may not join a batch: it runs alone, through Celery's usual path.
RUN_ALONE = 999


class Doubler(BatchTask):
    """``double`` in batches: each outcome says how many requests its batch held."""

    abstract = True

    def batchable(self, call) -> bool:
        return call.args[0] != RUN_ALONE

    def run_batch(self, calls):
        time.sleep(float(os.environ.get("DOUBLE_PAUSE", "0")))  # a worker about to be killed mid-batch
        return [ValueError(f"negative: {call.args[0]}") if call.args[0] < 0
                else {"double": 2 * call.args[0], "batch": len(calls), "pid": os.getpid(), "id": call.id}
                for call in calls]


@app.task(base=Doubler, acks_late=True)
def double(x: int) -> dict:
    """Run alone (prefork, or ``RUN_ALONE``): the same answer with a batch of one."""
    if x < 0:
        raise ValueError(f"negative: {x}")
    return {"double": 2 * x, "batch": 1, "pid": os.getpid()}


def _fail_first_cancel_read(kind: str) -> None:
    """Test hook (``DOUBLE_CANCEL_READ_FAULT``): the first batch's cancel read in this worker raises
    ``kind``, as a leader move fails a read in flight (``EtcdUnreachable``) or as a bug would
    (``RuntimeError``); later reads work."""
    import threading

    from etcd_broker.backend.result_store import ResultStore
    from etcd_broker.exceptions import EtcdUnreachable

    original, lock, fired = ResultStore.cancelled_among, threading.Lock(), []

    def cancelled_among(store, task_ids):
        with lock:
            fire, fired[:] = not fired, [True]
        if fire:
            raise EtcdUnreachable("injected: etcd unreachable") if kind == "EtcdUnreachable" else RuntimeError(
                "injected: a bug in the cancel read")
        return original(store, task_ids)

    ResultStore.cancelled_among = cancelled_among


if os.environ.get("DOUBLE_CANCEL_READ_FAULT"):
    _fail_first_cancel_read(os.environ["DOUBLE_CANCEL_READ_FAULT"])
