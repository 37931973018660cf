"""A Celery app for fault and security tests: every execution leaves marker keys that tests count.

Configured by env in worker processes (``ETCD_TEST_URL``, ``ETCD_TEST_PREFIX``,
``ETCD_TEST_LEASE_TTL``, ``ETCD_TEST_OPTIONS`` as JSON: user, password, ca_cert,
cert_key, cert_cert; ``ETCD_TEST_BACKEND=1`` adds the etcd result backend) and by
:func:`configure` in the test process. Test hook: ``FAULT_CHORD_EXIT=counted``, ``claimed``
or ``published`` makes a worker process exit (``os._exit``, as abrupt as SIGKILL) after it
counted a chord's last part: before the publisher claim, holding it, or after publishing the
callback but before deleting the chord's keys.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid

from celery import Celery

import etcd_broker  # noqa: F401 - registers etcdv3://
from etcd_broker.batches import BatchTask
from etcd_broker.core.client import CONNECTION_ERRORS, get_client
from etcd_broker.exceptions import EtcdNoSpace

logger = logging.getLogger(__name__)

#: A marker write retries this long while etcd is down or electing a leader (seconds).
MARK_RETRY_SECONDS = 60.0

URL = os.environ.get("ETCD_TEST_URL", "etcdv3://127.0.0.1:2379")
#: Where markers go: the broker's etcd unless a test counts on another one (one its fault leaves alone).
MARKER_URL = os.environ.get("ETCD_TEST_MARKER_URL") or None
PREFIX = os.environ.get("ETCD_TEST_PREFIX", "/deephardway-test")
LEASE_TTL = int(os.environ.get("ETCD_TEST_LEASE_TTL", "3"))
OPTIONS: dict[str, str] = json.loads(os.environ.get("ETCD_TEST_OPTIONS", "{}"))
WITH_BACKEND = os.environ.get("ETCD_TEST_BACKEND") == "1"
PREFETCH_MULTIPLIER = int(os.environ.get("ETCD_TEST_PREFETCH", "1"))
#: Exit code of a worker that the chord hook stopped (tests tell it from a crash).
CHORD_EXIT_CODE = 86
#: The worker's name in the chaos test's history (markers say which worker ran an execution).
WORKER_NAME = os.environ.get("CHAOS_WORKER", "")
#: How often ``work_steps`` looks for a cancel (seconds).
CANCEL_CHECK_INTERVAL = 0.2

app = Celery("counting", set_as_current=False)  # tests elsewhere in the run keep their current_app
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    worker_prefetch_multiplier=PREFETCH_MULTIPLIER,
    broker_connection_retry_on_startup=True,
    broker_connection_max_retries=None,
    task_queue_max_priority=9,
)


def configure(url: str, prefix: str, lease_ttl: int = 3, options: dict | None = None,
              backend: bool = False) -> None:
    """Point the app (in this process) at ``url``/``prefix``, dropping pooled connections."""
    global URL, PREFIX, LEASE_TTL, OPTIONS, WITH_BACKEND
    URL, PREFIX, LEASE_TTL, OPTIONS, WITH_BACKEND = url, prefix, lease_ttl, dict(options or {}), backend
    release()
    app.conf.update(
        broker_url=url,
        broker_transport_options={"prefix": prefix, "lease_ttl": lease_ttl, **OPTIONS},
        result_backend=url if backend else None,
        result_backend_transport_options={"prefix": prefix, **OPTIONS},
    )
    app._backend_cache = None
    app._local.__dict__.pop("backend", None)


def release() -> None:
    """Close this process's pooled connections (their watch threads would outlive the test's etcd)."""
    if app._pool is not None:
        app._pool.force_close_all()
    app._pool = None
    app.amqp._producer_pool = None


def worker_env(url: str, prefix: str, lease_ttl: int = 3, options: dict | None = None,
               backend: bool = False, marker_url: str | None = None) -> dict[str, str]:
    """The environment that configures a worker process like :func:`configure` does this one
    (``marker_url``: count executions on that etcd instead of ``url``)."""
    return {"ETCD_TEST_URL": url, "ETCD_TEST_PREFIX": prefix, "ETCD_TEST_LEASE_TTL": str(lease_ttl),
            "ETCD_TEST_OPTIONS": json.dumps(options or {}), "ETCD_TEST_BACKEND": "1" if backend else "0",
            "ETCD_TEST_MARKER_URL": marker_url or ""}


def marker_prefix(prefix: str, kind: str) -> str:
    """Where executions leave ``kind`` markers (test-only keys, outside the transport's layout)."""
    return f"{prefix}/markers/{kind}/"


def mark(kind: str, task_id: str, **info) -> None:
    """Record one execution step; retried until etcd answers or has space again (the key is unique, so
    a retry is idempotent): the counting must not be what fails."""
    key = f"{marker_prefix(PREFIX, kind)}{task_id}/{uuid.uuid4().hex}"
    value = json.dumps({"task_id": task_id, "host": socket.gethostname(), "pid": os.getpid(),
                        "worker": WORKER_NAME, "at": time.time(), **info})
    deadline = time.monotonic() + MARK_RETRY_SECONDS
    while True:
        try:
            get_client(MARKER_URL or URL, **OPTIONS).put(key, value)
            return
        except (*CONNECTION_ERRORS, EtcdNoSpace):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# ignore_result is fixed when the app first binds its tasks; stated here, configure() cannot move it.
@app.task(bind=True, acks_late=True, ignore_result=False)
def work(self, seconds: float) -> str:
    """Take ``seconds``; markers say when it started and finished (acks_late: survives a kill)."""
    return _counted(self.request, seconds)


@app.task(bind=True, ignore_result=False)
def work_early(self, seconds: float) -> str:
    """:func:`work` with Celery's default early ack (at most once if its worker dies)."""
    return _counted(self.request, seconds)


@app.task(bind=True, acks_late=True, ignore_result=False)
def work_steps(self, seconds: float) -> str:
    """:func:`work` in small steps, each a cooperative cancel point: ``revoke(terminate=True)`` stops it
    on a threads worker (REVOKED, ``Ignore``) as the prefork pool stops it with a signal."""
    mark("started", self.request.id, redelivered=bool((self.request.delivery_info or {}).get("redelivered")))
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            self.backend.stop_if_cancelled(self.request.id)
        except CONNECTION_ERRORS:  # etcd unreachable for a moment: look again at the next step
            logger.warning("cancel check of %s failed: etcd unreachable", self.request.id)
        time.sleep(min(left, CANCEL_CHECK_INTERVAL))
    mark("done", self.request.id)
    return self.request.id


def _counted(request, seconds: float) -> str:
    redelivered = bool((request.delivery_info or {}).get("redelivered"))
    mark("started", request.id, redelivered=redelivered)
    time.sleep(seconds)
    mark("done", request.id)
    return request.id


class CountingBatch(BatchTask):
    """:func:`work_batch` on a threads worker: the requests received together run as one batch
    (etcd_broker/batches.py), each leaving its own markers."""

    abstract = True

    def run_batch(self, calls):
        for call in calls:
            mark("started", call.id, redelivered=bool(call.delivery_info.get("redelivered")), batch=len(calls))
        time.sleep(max(call.args[0] for call in calls))
        for call in calls:
            mark("done", call.id)
        return [call.id for call in calls]


@app.task(bind=True, base=CountingBatch, acks_late=True, ignore_result=False)
def work_batch(self, seconds: float) -> str:
    """:func:`work` as a batched task (alone, e.g. on prefork, it runs exactly as ``work``)."""
    return _counted(self.request, seconds)


@app.task(bind=True, acks_late=True, ignore_result=False)
def collect(self, results: list[str]) -> int:
    """A chord callback: markers like :func:`work`; returns how many header results it got."""
    mark("started", self.request.id, redelivered=bool((self.request.delivery_info or {}).get("redelivered")))
    mark("done", self.request.id)
    return len(results)


def _exit_in_chord_publish(point: str) -> None:
    """Test hook: die after counting a chord's last part: before taking the publisher claim
    (``counted``), holding it (``claimed``), or after publishing, before deleting the chord (``published``)."""
    from etcd_broker.backend.result_backend import EtcdBackend

    method = "_complete_chord" if point == "counted" else "_chord_publish"
    original = getattr(EtcdBackend, method)

    def exit_here(backend, *args, **kwargs):
        if point == "published":
            original(backend, *args, **kwargs)
        logger.warning("FAULT_CHORD_EXIT=%s: exiting in a chord's publish", point)
        os._exit(CHORD_EXIT_CODE)

    setattr(EtcdBackend, method, exit_here)


if os.environ.get("FAULT_CHORD_EXIT"):
    _exit_in_chord_publish(os.environ["FAULT_CHORD_EXIT"])

configure(URL, PREFIX, LEASE_TTL, OPTIONS, WITH_BACKEND)
