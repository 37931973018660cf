"""Prometheus metrics of a Celery worker, served by the worker itself (docs/metrics.md).

Set ``WORKER_METRICS_PORT`` and the worker's main process serves ``/metrics`` on that port
(``WORKER_METRICS_ADDR``, default all interfaces) from ``worker_init``: tasks by outcome,
failures by exception, task run time, tasks running, pool processes up against those wanted
(etcd_broker.pool_health), and the models' micro-batch sizes. Only
Celery signals are used, so any pool works: threads share one process; prefork children write
to ``PROMETHEUS_MULTIPROC_DIR`` (required with prefork: an empty directory per worker) and the
main process adds them up. Imported by every worker through ``CELERY_IMPORTS``; no Django.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from celery import signals
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.multiprocess import mark_process_dead

from etcd_broker import pool_health
from jobs.exporter import DEFAULT_ADDR, MULTIPROC_VARIABLE, port_from_env, serve
from ml import batching

logger = logging.getLogger(__name__)

#: Port of the worker's /metrics; unset means no exporter.
PORT_VARIABLE = "WORKER_METRICS_PORT"
#: Address the exporter binds (Prometheus scrapes the worker host from elsewhere).
ADDR_VARIABLE = "WORKER_METRICS_ADDR"
#: Task run time buckets (seconds): a classification ~10 ms, a generation seconds, training minutes.
RUNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600)
#: Batch size buckets: powers of two up to the largest BATCH_MAX_SIZE anyone should use.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

TASKS = Counter("deephardway_worker_tasks", "Tasks this worker finished, by final state",
                ["task", "state"])
FAILURES = Counter("deephardway_worker_task_failures", "Tasks that raised, by exception type",
                   ["task", "exception"])
RUNTIME = Histogram("deephardway_worker_task_seconds", "Time from a task's start to its end in the worker",
                    ["task"], buckets=RUNTIME_BUCKETS)
RUNNING = Gauge("deephardway_worker_tasks_running", "Tasks executing now", ["task"],
                multiprocess_mode="livesum")
POOL_UP = Gauge("deephardway_worker_pool_processes", "Pool processes up and ready for tasks (prefork: "
                "children that reported to billiard; other pools: their size)", multiprocess_mode="livemax")
POOL_WANTED = Gauge("deephardway_worker_pool_processes_wanted", "Pool processes the worker should have "
                    "(-c, or the autoscaler's current size)", multiprocess_mode="livemax")
BATCH_SIZE = Histogram("deephardway_worker_batch_size", "Requests per forward pass (micro-batching)",
                       ["model"], buckets=BATCH_BUCKETS)

_started: dict[str, float] = {}  # task id -> monotonic start (one process; threads write distinct ids)
_lock = threading.Lock()


@signals.task_prerun.connect
def task_started(task_id: str | None = None, task: Any = None, **kwargs: Any) -> None:
    with _lock:
        _started[task_id] = time.monotonic()
    RUNNING.labels(task.name).inc()


@signals.task_postrun.connect
def task_ended(task_id: str | None = None, task: Any = None, state: str | None = None, **kwargs: Any) -> None:
    with _lock:
        started = _started.pop(task_id, None)
    RUNNING.labels(task.name).dec()
    if started is not None:
        RUNTIME.labels(task.name).observe(time.monotonic() - started)
    TASKS.labels(task.name, (state or "UNKNOWN").lower()).inc()


@signals.task_revoked.connect
def task_revoked(sender: Any = None, request: Any = None, **kwargs: Any) -> None:
    """Revoked before it ran, or terminated while running (no task_postrun then)."""
    TASKS.labels(getattr(sender, "name", None) or getattr(request, "task", "unknown"), "revoked").inc()


@signals.task_failure.connect
def task_failed(sender: Any = None, exception: BaseException | None = None, **kwargs: Any) -> None:
    FAILURES.labels(getattr(sender, "name", "unknown"), type(exception).__name__).inc()


def observe_batch(model: str, size: int) -> None:
    BATCH_SIZE.labels(model).observe(size)


batching.BATCH_OBSERVERS.append(observe_batch)


def observe_pool(reading: pool_health.PoolReading) -> None:
    """The worker's main process read its pool (etcd_broker.pool_health, every few seconds)."""
    POOL_UP.set(reading.up)
    POOL_WANTED.set(reading.wanted)


pool_health.OBSERVERS.append(observe_pool)


@signals.worker_init.connect
def start_exporter(sender: Any = None, **kwargs: Any) -> None:
    """In the worker's main process, before any pool child exists: serve /metrics.

    A setting that cannot work stops the worker with a message naming it (SystemExit: Celery
    logs and ignores ordinary exceptions from signal handlers)."""
    try:
        port = port_from_env(PORT_VARIABLE)
        if port is None:
            return
        pool = str(getattr(sender, "pool_cls", "") or "")
        if "prefork" in pool.lower() and not os.environ.get(MULTIPROC_VARIABLE):
            raise ValueError(f"{PORT_VARIABLE} with the prefork pool needs {MULTIPROC_VARIABLE} set to an "
                             "empty directory for this worker: the pool's children keep their task metrics "
                             "there (without it /metrics would show none of them)")
        serve(port, os.environ.get(ADDR_VARIABLE, DEFAULT_ADDR), PORT_VARIABLE)
    except (ValueError, OSError) as exc:
        raise SystemExit(str(exc)) from None


@signals.worker_process_shutdown.connect
def child_exited(pid: int | None = None, **kwargs: Any) -> None:
    """A prefork child ends: its 'tasks running' gauge file stops counting (counters stay)."""
    if os.environ.get(MULTIPROC_VARIABLE):
        mark_process_dead(pid or os.getpid())
