"""GET /api/jobs/<id>/events: Server-Sent Events straight from the result backend's watch.

One ``state`` event per task state change (``id:`` is the etcd revision, so a reconnecting
EventSource sends Last-Event-ID and misses nothing), ``position`` events while the job
waits, a heartbeat comment every JOBS_SSE_HEARTBEAT_SECONDS, and the stream ends at a
final state. One subscription on the process's etcd watch hub serves the whole stream.
Each open stream holds one server thread: run gunicorn with gthread workers.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connection
from django.http import HttpRequest, StreamingHttpResponse

from jobs.api.auth import api, get_job
from jobs.models import CELERY_STATES, Job, Status
from jobs.services import describe_error, partial_of

logger = logging.getLogger(__name__)

#: How long a disconnected EventSource waits before reconnecting (milliseconds).
RETRY_MS = 2000
#: etcd revisions are int64: a Last-Event-ID outside 0..2**63-1 was never one of ours.
MAX_REVISION = 2**63 - 1


@api("GET")
def job_events(request: HttpRequest, job_id: str) -> StreamingHttpResponse:
    job = get_job(request, job_id)
    after = last_event_id(request)
    response = StreamingHttpResponse(stream(job, after), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache, no-transform"
    response["X-Accel-Buffering"] = "no"  # nginx: do not buffer the stream
    return response


def last_event_id(request: HttpRequest) -> int | None:
    """The revision a reconnecting client last saw (header, or ?last_event_id= for tests)."""
    raw = request.headers.get("Last-Event-ID") or request.GET.get("last_event_id")
    try:
        revision = int(raw) if raw else None
    except ValueError:
        return None
    return revision if revision is not None and 0 <= revision <= MAX_REVISION else None


def stream(job: Job, after: int | None) -> Iterator[str]:
    """The event stream for one job; holds no database connection while it waits."""
    yield f"retry: {RETRY_MS}\n\n"
    if job.is_final:
        yield sse(job_event(job), "state", job.revision or None)
        return
    waiting = {"ahead": job.jobs_ahead()}
    if waiting["ahead"] is not None:
        yield sse({"id": str(job.id), "jobs_ahead": waiting["ahead"]}, "position")
    _release_db()
    try:
        yield from _follow_job(job, after, waiting)
    except Exception:  # noqa: BLE001 - etcd away: end the stream; the browser reconnects with Last-Event-ID
        logger.warning("event stream of job %s broke; the client will reconnect", job.id, exc_info=True)


def _follow_job(job: Job, after: int | None, waiting: dict[str, int | None]) -> Iterator[str]:
    """State events from one subscription held for the whole stream; a clock of deadlines for the rest."""
    from deephardway_site.celery import app
    from etcd_broker.backend.result_backend import follow_task

    with follow_task(str(job.id), app=app, after_revision=after) as events:
        if events.finished:
            # The client saw the final state already. Say it again, so the browser closes its
            # EventSource instead of reconnecting.
            with follow_task(str(job.id), app=app) as current:
                final = current.next(timeout=None)
            yield sse(task_event(final), "state", final.revision)
            return
        clock = _Clock(waiting["ahead"] is not None)
        while not events.finished:
            event = events.next(timeout=clock.wait())
            if event is not None:
                data = task_event(event)
                if data["status"] != Status.QUEUED:
                    waiting["ahead"] = None
                    clock.stop_positions()
                yield sse(data, "state", event.revision)
                clock.sent()
                continue
            if clock.position_due():
                moved = _position_update(job, waiting["ahead"])
                if moved is not None:
                    waiting["ahead"] = moved
                    yield sse({"id": str(job.id), "jobs_ahead": moved}, "position")
                    clock.sent()
            if clock.heartbeat_due():
                yield ": heartbeat\n\n"
                clock.sent()


class _Clock:
    """When the stream next owes a heartbeat (after quiet) and a place-in-line check (while queued)."""

    def __init__(self, queued: bool) -> None:
        now = time.monotonic()
        self.heartbeat_at = now + settings.JOBS_SSE_HEARTBEAT_SECONDS
        self.position_at = now + settings.JOBS_SSE_POSITION_SECONDS if queued else math.inf

    def wait(self) -> float:
        """Seconds until the next thing is due."""
        return max(0.0, min(self.heartbeat_at, self.position_at) - time.monotonic())

    def sent(self) -> None:
        self.heartbeat_at = time.monotonic() + settings.JOBS_SSE_HEARTBEAT_SECONDS

    def stop_positions(self) -> None:
        self.position_at = math.inf

    def position_due(self) -> bool:
        now = time.monotonic()
        if now < self.position_at:
            return False
        self.position_at = now + settings.JOBS_SSE_POSITION_SECONDS
        return True

    def heartbeat_due(self) -> bool:
        return time.monotonic() >= self.heartbeat_at


def _position_update(job: Job, position: int | None) -> int | None:
    """The job's new place in line if it still waits and moved; None otherwise."""
    if position is None:
        return None
    if not connection.in_atomic_block:
        close_old_connections()
    try:
        fresh = Job.objects.filter(pk=job.pk).first()
        now = fresh.jobs_ahead() if fresh is not None else None
    finally:
        _release_db()
    return now if now is not None and now != position else None


def _release_db() -> None:
    """A stream may stay open for minutes: do not hold a database connection meanwhile.

    Not inside a transaction (a test's, or ATOMIC_REQUESTS): closing there hands a connection
    in a transaction back to the pool, and the transaction's later queries fail with
    "the connection is closed" (PostgreSQL with a psycopg pool).
    """
    if not connection.in_atomic_block:
        connection.close()


def task_event(event: Any) -> dict[str, Any]:
    """A TaskEvent as the JSON a browser wants: status, progress, partial/result/error."""
    status = CELERY_STATES.get(event.state, Status.RUNNING)
    data: dict[str, Any] = {"id": event.task_id, "state": event.state, "status": status,
                            "progress": event.progress}
    result = event.result
    if event.state == "PROGRESS":
        data["partial"] = partial_of(result)
    elif status == Status.SUCCEEDED:
        data["result"], data["progress"] = result, 100
    elif status in (Status.FAILED, Status.CANCELLED):
        data["error"] = describe_error(result, cancelled=status == Status.CANCELLED)
    return data


def job_event(job: Job) -> dict[str, Any]:
    """The same shape from the Job row (for a job that finished before the stream opened)."""
    return {"id": str(job.id), "state": None, "status": job.status, "progress": job.progress,
            "result": job.result, "error": job.error}


def sse(data: dict[str, Any], event: str, event_id: int | None = None) -> str:
    lines = [f"event: {event}"]
    if event_id:
        lines.append(f"id: {event_id}")
    lines.append("data: " + json.dumps(data, separators=(",", ":")))
    return "\n".join(lines) + "\n\n"
