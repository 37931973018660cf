"""Training as jobs: submit a ``train_model`` job (deduplicated), and say how ready each model is.

A training job is a Job like any other (same queue, worker, result backend, admin, event
stream) owned by ``TRAINING_OWNER``, so everyone may watch it. A model is ``ready`` once its
file is in MODEL_DIR, ``training`` while a training job for it is queued or running (requests
get 503 with Retry-After: docs/api.md says why), ``untrained`` or ``unavailable`` otherwise.
"""
from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from jobs.models import TRAINING_OWNER, Job, Status
from jobs.services import Sender, enqueue
from jobs.validation import RequestRefused, fingerprint

logger = logging.getLogger(__name__)

#: The Celery task a training job runs (defined in jobs/tasks.py).
TRAIN_MODEL_TASK = "jobs.tasks.train_model"
#: Retry-After for a model whose training has no estimate yet is never under this (seconds).
MIN_RETRY_AFTER = 5

READY, TRAINING, UNTRAINED, UNAVAILABLE = "ready", "training", "untrained", "unavailable"


def send_training(job: Job, payload: dict[str, Any]) -> None:
    """Publish the job's ``train_model`` task by name (the web process never imports TensorFlow)."""
    from deephardway_site.celery import app

    app.send_task(TRAIN_MODEL_TASK, args=[job.model], kwargs=payload, priority=job.priority,
                  task_id=str(job.id), queue=job.queue)


def submit_training(name: str, epochs: int | None = None, *, only_missing: bool = True,
                    sender: Sender | None = None) -> tuple[Job | None, bool]:
    """Queue a training job for model ``name``; returns ``(job, created)``.

    An active training job for the model is returned instead of a second one; with
    ``only_missing`` a model already trained gets none (``(None, False)``). Raises
    RequestRefused (503) when the broker cannot be reached.
    """
    from jobs.validation import models

    spec = models()[name]
    existing = active_training().get(name)
    if existing is not None:
        return existing, False
    if only_missing and spec.is_trained(settings.MODEL_DIR):
        return None, False
    job = Job(model=name, input={"train": True, "epochs": epochs}, fingerprint=fingerprint({"train": name}),
              priority=settings.JOBS_DEFAULT_PRIORITY, owner_key=TRAINING_OWNER, created_at=timezone.now())
    try:
        with transaction.atomic():
            job.save(force_insert=True)
    except IntegrityError:  # another submitter won the race (the one-active-job constraint)
        winner = active_training().get(name)
        if winner is None:
            raise
        return winner, False
    enqueue(job, {"epochs": epochs, "only_missing": only_missing}, sender or send_training)
    logger.info("queued training of %s as job %s", name, job.id)
    return job, True


def active_training() -> dict[str, Job]:
    """The queued or running training job of each model that has one (oldest first)."""
    jobs = (Job.objects.filter(owner_key=TRAINING_OWNER).active().filter(cancel_requested_at__isnull=True)
            .order_by("created_at"))
    found: dict[str, Job] = {}
    for job in jobs:
        found.setdefault(job.model, job)
    return found


def ready_in(active: dict[str, Job]) -> dict[str, float]:
    """Seconds until each training model is ready: models train one at a time per worker, so a
    queued one waits for those before it; a running one says its own time left."""
    from jobs.validation import models

    total, found = 0.0, {}
    for job in sorted(active.values(), key=lambda j: (j.status != Status.RUNNING, j.created_at)):
        partial = job.partial or {}
        own = partial.get("eta_seconds") if partial.get("stage") == "training" else None
        if own is None:
            spec = models().get(job.model)
            own = spec.expected_train_seconds if spec is not None else 0.0
        total += float(own)
        found[job.model] = round(total, 1)
    return found


def readiness(spec: Any, active: dict[str, Job], eta: dict[str, float]) -> dict[str, Any]:
    """``state``, ``ready``, the model card once trained, and the training job while it trains."""
    card = spec.card(settings.MODEL_DIR)
    ok, _reason = spec.available(settings.MODEL_DIR)
    job = active.get(spec.name)
    if spec.is_trained(settings.MODEL_DIR):
        state = READY
    elif not ok:
        state = UNAVAILABLE
    else:
        state = TRAINING if job is not None else UNTRAINED
    training = None
    if job is not None:
        training = {**job.to_dict(), "ready_in_seconds": eta.get(spec.name)}
    return {"state": state, "ready": state == READY, "card": card if state == READY else None,
            "training": training}


def refuse_while_training(spec: Any) -> None:
    """503 with Retry-After when ``spec`` is not trained yet but its training job is on its way."""
    if spec.is_trained(settings.MODEL_DIR):
        return
    active = active_training()
    job = active.get(spec.name)
    if job is None:
        return
    seconds = ready_in(active).get(spec.name)
    from ml.progress import describe, duration

    where = (f"{describe(job.partial)}" if job.status == Status.RUNNING
             else f"training is queued ({job.jobs_ahead() or 0} job(s) ahead)")
    raise RequestRefused(
        f"model {spec.name!r} is still training ({where}); it should be ready in about {duration(seconds)}. "
        f"Try again then, or follow the training job at {job.to_dict(position=False)['events_url']}",
        field="model", status=503, headers={"Retry-After": str(max(MIN_RETRY_AFTER, round(seconds or 0)))},
        details={"training": {**job.to_dict(), "ready_in_seconds": seconds}})
