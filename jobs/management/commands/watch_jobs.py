"""``manage.py watch_jobs``: keep every Job row in step with its task's state in etcd.

One subscription to every task state (the result backend's key prefix, on the process's
etcd watch hub) feeds an inbox; the main thread applies each change to its Job within a
second. On start, and after etcd compacted history it had not read, it re-reads the state
of every unfinished job and follows changes from the revision of that read.
Workers never write to the database: this process is the only writer of job states.
"""
from __future__ import annotations

import logging
import queue
import signal
import threading
from collections.abc import Iterable
from typing import Any

from django.core.management.base import BaseCommand
from django.db import close_old_connections

from etcd_broker.backend.result_backend import EtcdBackend
from etcd_broker.backend.task_events import TaskEvent
from etcd_broker.core.watch import EVENT_PUT
from jobs import metrics, services
from jobs.models import Job

logger = logging.getLogger(__name__)

#: Seconds the main loop waits for a state change before checking whether to stop.
INBOX_WAIT = 1.0
#: Seconds between attempts to start watching while etcd is unreachable.
RETRY_SECONDS = 2.0
#: Value of a deleted (expired or forgotten) state key in the inbox.
DELETED = b""


def worker_of(meta: dict[str, Any]) -> str | None:
    """The worker host from Celery's stored meta (extended results, or STARTED's hostname)."""
    result = meta.get("result")
    if meta.get("worker"):
        return str(meta["worker"])
    if meta.get("status") == "STARTED" and isinstance(result, dict) and result.get("hostname"):
        return str(result["hostname"])
    return None


class JobWatcher:
    """Follows every task state under the backend's prefix and applies it to its Job."""

    def __init__(self, app: Any) -> None:
        backend = app.backend
        if not isinstance(backend, EtcdBackend):
            raise TypeError(f"watch_jobs needs the etcd result backend, not {type(backend).__name__}")
        self.backend = backend
        self.store = backend.store
        self.inbox: queue.SimpleQueue[tuple[str, bytes, int]] = queue.SimpleQueue()
        self.watch = None
        self.applied = 0

    def start(self) -> JobWatcher:
        """Read every unfinished job, then follow every change after that read's revision."""
        keys = self.store.keys
        revision = self.catch_up()
        self.watch = self.store.hub.subscribe(keys.results(), self._on_events, prefix=True,
                                              start_revision=revision + 1, on_resync=self._on_resync)
        logger.info("watching task states under %s from revision %d", keys.results(), revision + 1)
        return self

    def stop(self) -> None:
        if self.watch is not None:
            self.store.hub.unsubscribe(self.watch)
            self.watch = None

    def catch_up(self, job_ids: Iterable[str] | None = None) -> int:
        """Queue the stored state of every unfinished job; returns a revision at or before every read."""
        ids = list(job_ids) if job_ids is not None else [str(pk) for pk in
                                                           Job.objects.active().values_list("pk", flat=True)]
        found, revision = self.store.read_many(ids)
        for task_id, stored in found.items():
            self.inbox.put((task_id, stored.value, stored.mod_revision))
        logger.info("%d unfinished jobs re-read at revision %d", len(ids), revision)
        return revision

    def apply_pending(self, timeout: float = INBOX_WAIT) -> int:
        """Apply every queued change (waiting up to ``timeout`` for the first); returns how many."""
        applied = 0
        try:
            item = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return 0
        while True:
            applied += self._apply(*item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
        self.applied += applied
        return applied

    def run(self, stop: threading.Event) -> None:
        """Start (retrying while etcd is unreachable), then apply changes until ``stop`` is set."""
        while not stop.is_set():
            try:
                self.start()
                break
            except Exception:  # noqa: BLE001 - etcd not there yet: say so, try again
                logger.exception("could not start watching task states; retrying in %.0f s", RETRY_SECONDS)
                self.stop()
                stop.wait(RETRY_SECONDS)
        try:
            while not stop.is_set():
                close_old_connections()
                self.apply_pending()
        finally:
            self.stop()

    # -- the watch stream's thread only fills the inbox -------------------------------
    def _on_events(self, events: Any) -> None:
        for event in events:
            task_id = self.store.keys.task_id_of_result(event.kv.key)
            value = event.kv.value if event.type == EVENT_PUT else DELETED
            self.inbox.put((task_id, value, event.kv.mod_revision))

    def _on_resync(self) -> int:
        logger.warning("results history was compacted; re-reading every unfinished job")
        close_old_connections()
        return self.catch_up()

    def _apply(self, task_id: str, value: bytes, revision: int) -> int:
        try:
            meta = self.backend.decode(value) if value else {}
            event = (TaskEvent.from_meta(task_id, meta, revision) if value
                     else TaskEvent.pending(task_id, revision))
            job = services.apply_event(event, worker=worker_of(meta))
        except Exception:  # noqa: BLE001 - one bad value must not stop the watcher
            logger.exception("could not apply the state of task %s at revision %s", task_id, revision)
            return 0
        if job is not None:
            logger.debug("job %s: %s %s%%", job.id, job.status, job.progress)
        return int(job is not None)


class Command(BaseCommand):
    help = "Keep Job rows in step with their tasks' states (a prefix subscription on the etcd watch hub)."

    def handle(self, *args: Any, **options: Any) -> None:
        from deephardway_site.celery import app

        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        watcher = JobWatcher(app)
        if served := metrics.serve_from_env():  # METRICS_PORT: the job latency histograms
            self.stdout.write(f"watch_jobs: metrics on {served}")
        self.stdout.write(f"watch_jobs: following task states in etcd ({app.conf.result_backend})")
        watcher.run(stop)
        self.stdout.write(f"watch_jobs: stopped after applying {watcher.applied} state changes")
