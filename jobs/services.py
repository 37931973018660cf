"""What the API, the admin and the commands do to jobs: submit, deduplicate, cancel, retry,
and apply a task's state change (from the result backend's watch) to its Job row.

The Celery side is reached lazily through :func:`send_task` and :func:`cancel_task`, so
importing this module never imports ``jobs.tasks`` (nor, through it, TensorFlow).
"""
from __future__ import annotations

import datetime as dt
import io
import logging
import uuid
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core.files.base import ContentFile
from django.db import IntegrityError, connection, transaction
from django.utils import timezone
from PIL import Image

from jobs.messages import run_model_argsrepr
from jobs.models import CELERY_STATES, Job, Status
from jobs.validation import RequestRefused, Submission, lookup_model, prepare, rebuild_payload

logger = logging.getLogger(__name__)

#: The Celery task every job runs (defined in jobs/tasks.py).
RUN_MODEL_TASK = "jobs.tasks.run_model"

#: Stored input files are named by what Pillow found in them, so they are served as images.
IMAGE_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "GIF": "gif"}

Sender = Callable[[Job, dict[str, Any]], None]


def send_task(job: Job, payload: dict[str, Any]) -> None:
    """Publish the job's ``run_model`` task; its Celery task id is the Job id.

    By name (``send_task``), so the web process never imports jobs/tasks.py and, through it,
    the model code.
    """
    from deephardway_site.celery import app

    app.send_task(RUN_MODEL_TASK, args=[job.model, payload], priority=job.priority, task_id=str(job.id),
                  queue=job.queue, argsrepr=run_model_argsrepr(job.model, payload))



def submit(submission: Submission, *, owner_key: str, user: Any = None, session_key: str = "",
           client_address: str | None = None, sender: Sender | None = None) -> tuple[Job, bool]:
    """Create and queue a job, or return the caller's identical active one.

    Returns ``(job, created)``. Raises RequestRefused (429 over the per-owner cap, or for an
    anonymous caller over the per-address cap; 503 when the broker cannot be reached: the
    job is then marked failed). ``client_address`` is recorded for anonymous callers only.
    """
    existing = find_duplicate(owner_key, submission.model, submission.fingerprint)
    if existing is not None:
        return existing, False
    signed_in = user is not None and user.is_authenticated
    address = None if signed_in else client_address
    check_caps(owner_key, address)  # cheap refusal before any file is written
    job = Job(model=submission.model, input=submission.summary, fingerprint=submission.fingerprint,
              priority=submission.priority, owner=user if signed_in else None,
              session_key="" if signed_in else session_key, owner_key=owner_key,
              client_address=None if signed_in else client_address)
    if submission.image:
        job.input_file.save(f"{job.id}.{_extension(submission)}", ContentFile(submission.image), save=False)
    try:
        insert_within_caps(job, owner_key, address)
    except IntegrityError:
        # An identical request won the race between our duplicate check and our insert.
        _delete_file(job)
        existing = find_duplicate(owner_key, submission.model, submission.fingerprint)
        if existing is None:
            raise
        return existing, False
    except RequestRefused:
        _delete_file(job)
        raise
    enqueue(job, submission.payload, sender or send_task)
    return job, True


def find_duplicate(owner_key: str, model: str, print_: str) -> Job | None:
    return (Job.objects.owned_by(owner_key).active()
            .filter(model=model, fingerprint=print_, cancel_requested_at__isnull=True).first())


def insert_within_caps(job: Job, owner_key: str, address: str | None) -> None:
    """Insert the row with the caps checked again under a per-owner and per-address lock, so
    parallel requests from one owner cannot all pass the count (the site flood test found they did)."""
    with transaction.atomic():
        lock_caps(owner_key, address)
        check_caps(owner_key, address)
        job.created_at = timezone.now()  # queue order is insert order
        job.save(force_insert=True)


def check_caps(owner_key: str, address: str | None) -> None:
    """429 when the owner (or, signed out, the address) already has its cap of waiting jobs."""
    check_owner_cap(owner_key)
    if address:
        check_address_cap(address)


def lock_caps(owner_key: str, address: str | None) -> None:
    """Serialize cap checks and inserts per owner and address until the transaction ends, so
    parallel requests cannot all pass the count. SQLite needs nothing more: its IMMEDIATE
    transactions (settings) already take the write lock at BEGIN. PostgreSQL: advisory locks."""
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        for name in filter(None, (f"owner:{owner_key}", address and f"address:{address}")):
            cursor.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [name])


def check_owner_cap(owner_key: str) -> None:
    cap = settings.JOBS_MAX_QUEUED_PER_OWNER
    waiting = Job.objects.owned_by(owner_key).waiting().count()
    if waiting >= cap:
        raise RequestRefused(
            f"you have {waiting} queued jobs; the limit is {cap}. Wait for one to start, or cancel one.",
            status=429,
        )


def check_address_cap(address: str) -> None:
    """Anonymous sessions are free to make: cap the anonymous jobs waiting from one address too."""
    cap = settings.JOBS_MAX_QUEUED_PER_ADDRESS
    waiting = Job.objects.waiting().filter(client_address=address, owner__isnull=True).count()
    if waiting >= cap:
        raise RequestRefused(
            f"{waiting} anonymous jobs from your address are queued; the limit is {cap}. "
            "Wait for some to start, or sign in.", status=429,
        )


def enqueue(job: Job, payload: dict[str, Any], sender: Sender) -> None:
    """Hand the job to Celery; on failure the job is marked failed and 503 is raised."""
    try:
        sender(job, payload)
    except Exception as exc:  # noqa: BLE001 - any broker failure means "not queued"
        logger.exception("could not queue job %s", job.id)
        Job.objects.filter(pk=job.pk).update(status=Status.FAILED, finished_at=timezone.now(),
                                             error=f"could not queue the job: {exc}")
        raise RequestRefused(f"the job queue is unreachable ({type(exc).__name__}); try again shortly",
                             status=503) from exc


def _extension(submission: Submission) -> str:
    """The stored file's extension from the image's real format (never the client's file name)."""
    try:
        with Image.open(io.BytesIO(submission.image or b"")) as image:
            return IMAGE_EXTENSIONS.get(image.format or "", "bin")
    except (OSError, ValueError):
        return "bin"


def _read_file(job: Job) -> bytes | None:
    if not job.input_file:
        return None
    with job.input_file.open("rb") as handle:
        return handle.read()


def _delete_file(job: Job) -> None:
    if job.input_file:
        job.input_file.delete(save=False)


# -- cancel and retry --------------------------------------------------------------
def cancel_task(task_id: str, queued: bool) -> None:
    """Revoke the task and ask a running one to stop at its next progress point."""
    cancel_tasks([task_id], queued=queued)


def cancel_tasks(task_ids: list[str], *, queued: bool) -> None:
    """Cancel several tasks with one revoke broadcast.

    Running tasks stop at their next progress point (the backend's cancel marker). For
    ``queued`` ones REVOKED is recorded now, so their jobs end without waiting for a
    worker; a worker that takes one later finds the marker at its first progress point.
    """
    from deephardway_site.celery import app

    if not task_ids:
        return
    app.control.revoke(task_ids)
    for task_id in task_ids:
        app.backend.request_cancel(task_id)
        if queued:
            app.backend.mark_as_revoked(task_id, reason="cancelled before it started")


def cancel(job: Job, canceller: Callable[[str, bool], None] | None = None) -> Job:
    """Cancel a queued or running job; 409 if it already finished."""
    if job.is_final:
        raise RequestRefused(f"job {job.id} already {job.status}; there is nothing to cancel", status=409)
    if job.cancel_requested_at is None:
        job.cancel_requested_at = timezone.now()
        job.save(update_fields=["cancel_requested_at"])
    try:
        (canceller or cancel_task)(str(job.id), job.status == Status.QUEUED)
    except Exception as exc:  # noqa: BLE001 - the request is recorded; say the queue is unreachable
        logger.exception("could not cancel job %s", job.id)
        raise RequestRefused(f"the job queue is unreachable ({type(exc).__name__}); cancel was recorded "
                             "and will be retried on the next cancel", status=503) from exc
    return job


def retry(job: Job, sender: Sender | None = None) -> Job:
    """A new job with the same input, owner and priority as a finished one."""
    if not job.is_final:
        raise RequestRefused(f"job {job.id} is still {job.status}; only finished jobs can be retried",
                             status=409)
    if job.is_training:
        from jobs.training import submit_training

        return submit_training(job.model, job.input.get("epochs"), only_missing=False)[0]
    image = _read_file(job)
    payload = rebuild_payload(job.input, image)
    submission = prepare(lookup_model(job.model), payload, job.priority, original=image,
                         image_name=job.input_file.name if job.input_file else "")
    new, _ = submit(submission, owner_key=job.owner_key, user=job.owner, session_key=job.session_key,
                    sender=sender)
    return new


# -- following the result backend ------------------------------------------------
def apply_event(event: Any, worker: str | None = None) -> Job | None:
    """Apply one task state change (a TaskEvent) to its Job; returns the Job, or None if unknown.

    Idempotent and ordered: an event at or below the job's last applied revision, or
    after the job reached a final status, changes nothing. A PENDING event (the state
    expired or was forgotten) never moves a started job back to queued.
    """
    status = CELERY_STATES.get(event.state)
    if status is None:
        logger.warning("task %s: unknown state %r ignored", event.task_id, event.state)
        return None
    try:
        job_id = uuid.UUID(str(event.task_id))
    except ValueError:
        return None  # another kind of task (training, tests): not a job
    with transaction.atomic():
        job = Job.objects.select_for_update().filter(pk=job_id).first()
        if job is None or job.is_final or (event.revision or 0) <= job.revision:
            return job
        if status == Status.QUEUED and job.status != Status.QUEUED:
            return job
        changed = _apply_state(job, status, event, worker)
        job.revision = event.revision
        job.save(update_fields=[*changed, "revision"])
    return job


def _apply_state(job: Job, status: str, event: Any, worker: str | None) -> list[str]:
    now = timezone.now()
    job.status = status
    changed = ["status", "progress"]
    if worker:
        job.worker, changed = worker[:200], [*changed, "worker"]
    if status == Status.RUNNING and job.started_at is None:
        job.started_at, changed = now, [*changed, "started_at"]
    if event.progress is not None:
        job.progress = max(0, min(100, int(event.progress)))
    if event.state == "PROGRESS":
        job.partial = partial_of(event.result)
        changed.append("partial")
    if status in (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED):
        job.finished_at = _done_at(event) or now
        changed.append("finished_at")
        if job.started_at is not None and job.started_at > job.finished_at:
            # started_at is our clock when the STARTED change was applied, finished_at the
            # worker's: when both were applied in one batch, keep them in order.
            job.started_at, changed = job.finished_at, [*changed, "started_at"]
        changed += _apply_outcome(job, status, event)
    return changed


def partial_of(result: Any) -> dict[str, Any] | None:
    """What a PROGRESS meta carries besides the percentage (e.g. the text so far)."""
    if not isinstance(result, dict):
        return None
    return {k: v for k, v in result.items() if k != "progress"} or None


def _apply_outcome(job: Job, status: str, event: Any) -> list[str]:
    if status == Status.SUCCEEDED:
        job.progress, job.result, job.partial = 100, event.result, None
        return ["result", "partial"]
    job.error = describe_error(event.result, cancelled=status == Status.CANCELLED)
    return ["error"]


def describe_error(result: Any, *, cancelled: bool = False) -> str:
    """A readable message from Celery's failure meta ({"exc_type", "exc_message"})."""
    if isinstance(result, dict) and ("exc_type" in result or "exc_message" in result):
        message = result.get("exc_message")
        if isinstance(message, (list, tuple)):
            message = " ".join(str(part) for part in message)
        if cancelled and result.get("exc_type") in ("TaskRevokedError", "Terminated", None):
            return f"cancelled: {message}" if message else "cancelled"
        return f"{result.get('exc_type', 'Error')}: {message}" if message else str(result.get("exc_type"))
    if cancelled:
        return "cancelled"
    return str(result) if result else "failed"


def _done_at(event: Any):
    done = getattr(event, "date_done", None)
    if not done:
        return None
    if isinstance(done, str):
        from django.utils.dateparse import parse_datetime

        done = parse_datetime(done)
    if done is not None and timezone.is_naive(done):
        done = timezone.make_aware(done, dt.UTC)
    return done
