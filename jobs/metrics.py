"""Prometheus metrics of the site: ``GET /metrics`` (docs/metrics.md says what each one means).

Read at scrape time: queue depth per queue and priority, unacknowledged messages and live
consumers (etcd, ``etcd_broker.stats``), jobs queued and running and the oldest waiting job
(database).
Recorded as they happen, by whichever process saves the Job (the web for submissions,
``watch_jobs`` for state changes): submissions and the latency histograms queued -> started ->
finished. With ``PROMETHEUS_MULTIPROC_DIR`` set (gunicorn with several workers, ``watch_jobs``
beside them), each process writes its samples there and the view adds them up. ``watch_jobs``
elsewhere serves what it records itself on ``METRICS_PORT`` (:func:`serve_from_env`).
"""
from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Min
from django.db.models.signals import post_save
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from etcd_broker.core.ops import MAX_PRIORITY
from jobs.exporter import DEFAULT_ADDR, port_from_env, recorded_registry, serve
from jobs.models import ACTIVE_STATUSES, FINAL_STATUSES, MODEL_QUEUE, Job, Status
from ml.registry import MODELS

logger = logging.getLogger(__name__)

#: Port on which a site process other than the web (``watch_jobs``) serves what it records.
PORT_VARIABLE = "METRICS_PORT"
#: Address that exporter binds (default: all interfaces).
ADDR_VARIABLE = "METRICS_ADDR"
#: Latency buckets (seconds): a classification takes ~10 ms, a long generation minutes, training more.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

JOBS_SUBMITTED = Counter("deephardway_jobs_submitted", "Jobs accepted (Job rows created)", ["model", "queue"])
JOB_WAIT = Histogram("deephardway_job_wait_seconds", "Queued -> started: time a job waited for a worker",
                     ["model", "queue"], buckets=LATENCY_BUCKETS)
JOB_RUN = Histogram("deephardway_job_run_seconds", "Started -> finished: time a worker spent on a job",
                    ["model", "outcome"], buckets=LATENCY_BUCKETS)
JOB_TOTAL = Histogram("deephardway_job_total_seconds", "Queued -> finished: what the user waited in all",
                      ["model", "outcome"], buckets=LATENCY_BUCKETS)


def seconds_between(start, end) -> float:
    return max(0.0, (end - start).total_seconds())


def record_job_change(sender: type[Job], instance: Job, created: bool = False,
                      update_fields: Iterable[str] | None = None, **kwargs: Any) -> None:
    """post_save: count a new job; observe the wait when it starts and the rest when it ends.
    Recorded once the transaction commits (a rolled-back save counts nothing)."""
    job, fields = instance, set(update_fields or ())
    records: list[Callable[[], None]] = []
    if created:
        records.append(JOBS_SUBMITTED.labels(job.model, job.queue).inc)
    elif "started_at" in fields and job.status == Status.RUNNING and job.started_at is not None:
        records.append(partial(JOB_WAIT.labels(job.model, job.queue).observe,
                               seconds_between(job.created_at, job.started_at)))
    if not created and "finished_at" in fields and job.status in FINAL_STATUSES and job.finished_at is not None:
        if job.started_at is not None:
            records.append(partial(JOB_RUN.labels(job.model, job.status).observe,
                                   seconds_between(job.started_at, job.finished_at)))
        records.append(partial(JOB_TOTAL.labels(job.model, job.status).observe,
                               seconds_between(job.created_at, job.finished_at)))
    for record in records:
        transaction.on_commit(record, robust=True)


post_save.connect(record_job_change, sender=Job, dispatch_uid="jobs.metrics.record_job_change")


# --- read at scrape time ------------------------------------------------------------------

def broker_queues() -> list[dict[str, Any]]:
    """Queue rows from etcd (``etcd_broker.stats.queue_stats``) for this site's prefix."""
    from etcd_broker.core.client import get_client
    from etcd_broker.core.ops import KeySpace
    from etcd_broker.stats import queue_stats

    return queue_stats(get_client(settings.ETCD_URL, **settings.ETCD_OPTIONS), KeySpace(settings.ETCD_PREFIX))


class BrokerCollector:
    """Queue depth by priority, unacknowledged messages, live consumers; ``..._broker_up`` 0 if
    etcd did not answer (the scrape itself still succeeds)."""

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("deephardway_broker_up", "1 if etcd answered this scrape's queue reads")
        try:
            rows = broker_queues()
        except Exception as exc:  # noqa: BLE001 - any failure is reported as a metric, not a 500
            logger.warning("metrics: etcd did not answer: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        ready = GaugeMetricFamily("deephardway_queue_ready_messages",
                                  "Messages waiting in a queue, by priority (9 = most urgent)",
                                  labels=["queue", "priority"])
        unacked = GaugeMetricFamily("deephardway_queue_unacked_messages",
                                    "Messages a worker holds (prefetched or running), not yet acknowledged",
                                    labels=["queue"])
        delayed = GaugeMetricFamily("deephardway_queue_delayed_messages",
                                    "ETA tasks (countdown, eta) waiting in etcd until due, not in a worker",
                                    labels=["queue"])
        next_due = GaugeMetricFamily("deephardway_queue_next_due_timestamp_seconds",
                                     "When the queue's next delayed message is due (epoch seconds; absent: none)",
                                     labels=["queue"])
        consumers = GaugeMetricFamily("deephardway_queue_consumers",
                                      "Live consumers (workers whose etcd lease is alive) of a queue",
                                      labels=["queue"])
        for row in rows:
            for priority in range(MAX_PRIORITY + 1):
                ready.add_metric([row["queue"], str(priority)], row["ready_by_priority"].get(priority, 0))
            unacked.add_metric([row["queue"]], row["unacked"])
            delayed.add_metric([row["queue"]], row["delayed"])
            if row["next_due"] is not None:
                next_due.add_metric([row["queue"]], row["next_due"])
            consumers.add_metric([row["queue"]], row["consumers"])
        yield from (ready, unacked, delayed, next_due, consumers)
        yield from etcd_gauges()


def etcd_gauges() -> Iterator[Metric]:
    """etcd's DB size and compaction lag (``etcd_broker.core.maintenance.etcd_status``) for operators who
    do not scrape etcd's own /metrics."""
    from etcd_broker.core.client import get_client
    from etcd_broker.core.maintenance import etcd_status
    from etcd_broker.core.ops import KeySpace

    try:
        status = etcd_status(get_client(settings.ETCD_URL, **settings.ETCD_OPTIONS), KeySpace(settings.ETCD_PREFIX))
    except Exception as exc:  # noqa: BLE001 - the queue gauges above still go out
        logger.warning("metrics: etcd status not read: %s", exc)
        return
    for name, text, number in (
            ("deephardway_etcd_db_size_bytes", "etcd's database file (what --quota-backend-bytes limits)",
             status.db_size),
            ("deephardway_etcd_db_size_in_use_bytes", "Of the database file, bytes in use (the rest: freed "
             "by compaction, given back by defragmenting)", status.db_size_in_use),
            ("deephardway_etcd_compaction_lag_revisions", "Revisions since etcd's last compaction",
             status.compaction_lag)):
        if number is not None:
            gauge = GaugeMetricFamily(name, text)
            gauge.add_metric([], number)
            yield gauge
    alarms = GaugeMetricFamily("deephardway_etcd_alarm", "1 while etcd raises this alarm (NOSPACE: no writes)",
                               labels=["alarm"])
    for alarm in ("NOSPACE", "CORRUPT"):
        alarms.add_metric([alarm], int(alarm in status.alarms))
    yield alarms


def job_queues() -> list[str]:
    """The queues jobs go to: the model queue and any other the task routes name."""
    routed = {route["queue"] for route in settings.CELERY_TASK_ROUTES.values() if "queue" in route}
    return sorted({MODEL_QUEUE} | routed)


class JobCollector:
    """Jobs waiting and running, by queue and model, and the age of the oldest waiting job.

    Only the live states, queue by queue (an index range scan: 4 ms at a million rows, where a
    count of every state took a second; docs/metrics.md); finished jobs are counted as they
    finish (``JOB_TOTAL``)."""

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("deephardway_database_up", "1 if the database answered this scrape's job counts")
        try:
            counts = list(Job.objects.filter(queue__in=job_queues()).active()
                          .values_list("queue", "model", "status").annotate(n=Count("pk")).order_by())
            oldest = list(Job.objects.waiting().values_list("queue").annotate(first=Min("created_at")).order_by())
        except Exception as exc:  # noqa: BLE001 - any failure is reported as a metric, not a 500
            logger.warning("metrics: database did not answer: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        jobs = GaugeMetricFamily("deephardway_jobs", "Jobs queued or running now (database)",
                                 labels=["queue", "model", "state"])
        found = {(queue, model, state): n for queue, model, state, n in counts}
        pairs = {(queue, model) for queue in job_queues() for model in MODELS} | {key[:2] for key in found}
        for queue, model in sorted(pairs):  # every model's series, 0 when idle, so none disappears
            for state in ACTIVE_STATUSES:
                jobs.add_metric([queue, model, state], found.get((queue, model, state), 0))
        yield jobs
        age = GaugeMetricFamily("deephardway_job_oldest_waiting_seconds",
                                "Age of the oldest queued job not being cancelled", labels=["queue"])
        now = timezone.now()
        for queue, first in oldest:
            age.add_metric([queue], seconds_between(first, now))
        yield age


class Scrape:
    """What one scrape reports: the recorded metrics (this process's, or every process's
    in multiprocess mode) and the collectors read now."""

    def __init__(self) -> None:
        self.sources = (recorded_registry(), BrokerCollector(), JobCollector())

    def collect(self) -> Iterator[Metric]:
        for source in self.sources:
            yield from source.collect()


def serve_from_env() -> str | None:
    """With METRICS_PORT set, serve what this process records (``watch_jobs``: the latency
    histograms) on it and return the URL; CommandError naming the variable if it cannot.
    The web serves GET /metrics instead."""
    from django.core.management import CommandError

    try:
        port = port_from_env(PORT_VARIABLE)
        return None if port is None else serve(port, os.environ.get(ADDR_VARIABLE, DEFAULT_ADDR), PORT_VARIABLE)
    except (ValueError, OSError) as exc:
        raise CommandError(str(exc)) from None


def authorized(request: HttpRequest) -> bool:
    """No METRICS_TOKEN: open (keep /metrics off the public proxy); else ``Authorization: Bearer``."""
    token = settings.METRICS_TOKEN
    if not token:
        return True
    given = request.headers.get("Authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    """GET /metrics in Prometheus' text format."""
    if not authorized(request):
        return HttpResponse("metrics need Authorization: Bearer <METRICS_TOKEN>\n", status=401,
                            content_type="text/plain", headers={"WWW-Authenticate": "Bearer"})
    return HttpResponse(generate_latest(Scrape()), content_type=CONTENT_TYPE_LATEST)
