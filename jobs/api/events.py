"""GET /api/jobs/<id>/events: Server-Sent Events straight from the result backend's watch.

One ``state`` event per task state change (``id:`` is the etcd revision, so a reconnecting
EventSource sends Last-Event-ID and misses nothing), ``position`` events while the job
waits, a heartbeat comment every JOBS_SSE_HEARTBEAT_SECONDS, and the stream ends at a
final state. Each open stream holds one server thread: run gunicorn with gthread workers.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from django.conf import settings
from django.db import close_old_connections, connection
from django.http import HttpRequest, StreamingHttpResponse

from jobs.api.auth import api, get_job
from jobs.models import CELERY_STATES, FINAL_STATUSES, Job, Status
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
    quiet_since = time.monotonic()
    tick = lambda: _tick_seconds(waiting["ahead"])  # noqa: E731 - re-read after every event
    for item in follow(str(job.id), after, tick=tick):
        if item is None:
            moved = _position_update(job, waiting["ahead"])
            if moved is not None:
                waiting["ahead"] = moved
                yield sse({"id": str(job.id), "jobs_ahead": moved}, "position")
            elif time.monotonic() - quiet_since >= settings.JOBS_SSE_HEARTBEAT_SECONDS - 0.5:
                yield ": heartbeat\n\n"
            else:
                continue
            quiet_since = time.monotonic()
            continue
        data = task_event(item)
        if data["status"] != Status.QUEUED:
            waiting["ahead"] = None
        yield sse(data, "state", item.revision)
        quiet_since = time.monotonic()
        if data["status"] in FINAL_STATUSES:
            return


def follow(task_id: str, after: int | None, *, tick: Callable[[], float]) -> Iterator[Any]:
    """The backend's watch for one task: TaskEvents, and None after each ``tick`` seconds of quiet."""
    from deephardway_site.celery import app
    from etcd_broker.backend import watch_task

    while True:
        try:
            for event in watch_task(task_id, app=app, after_revision=after, timeout=tick()):
                yield event
                after = event.revision
                if event.final:
                    return
        except TimeoutError:
            yield None
            continue
        # The watch ended at once: the client saw the final state already. Say it again, so
        # the browser closes its EventSource instead of reconnecting.
        events = watch_task(task_id, app=app)
        try:
            yield next(events)
        finally:
            events.close()
        return


def _tick_seconds(position: int | None) -> float:
    if position is not None:
        return min(settings.JOBS_SSE_POSITION_SECONDS, settings.JOBS_SSE_HEARTBEAT_SECONDS)
    return settings.JOBS_SSE_HEARTBEAT_SECONDS


def _position_update(job: Job, position: int | None) -> int | None:
    """The job's new place in line if it still waits and moved; None otherwise."""
    if position is None:
        return None
    close_old_connections()
    try:
        fresh = Job.objects.filter(pk=job.pk).first()
        now = fresh.jobs_ahead() if fresh is not None else None
    finally:
        _release_db()
    return now if now is not None and now != position else None


def _release_db() -> None:
    """A stream may stay open for minutes: do not hold a database connection meanwhile."""
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
