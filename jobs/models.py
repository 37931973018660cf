"""The Job: the user-facing record of one model request, and API tokens for scripts.

A Job's id is its Celery task id. Only ``watch_jobs`` moves a Job through its states
(from the result backend's watch); workers never write to the database.
"""
from __future__ import annotations

import hashlib
import logging
import secrets
import uuid
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.urls import reverse
from django.utils import timezone

from jobs.queues import GPU_QUEUE

logger = logging.getLogger(__name__)

#: The Celery queue every model request goes to (workers: ``-Q gpu,default``).
MODEL_QUEUE = GPU_QUEUE
#: Owner key of the jobs that train models (``manage.py dev``, ``train_models --queue``):
#: no user or session has it, and everyone may watch these jobs (a model page shows them).
TRAINING_OWNER = "system:training"
#: Prefix of every API token, so a leaked one is recognisable in logs and scanners.
TOKEN_PREFIX = "dhw_"


class Status(models.TextChoices):
    QUEUED = "queued", "queued"
    RUNNING = "running", "running"
    SUCCEEDED = "succeeded", "succeeded"
    FAILED = "failed", "failed"
    CANCELLED = "cancelled", "cancelled"


ACTIVE_STATUSES = (Status.QUEUED, Status.RUNNING)
FINAL_STATUSES = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)

#: Celery task states as Job statuses (PROGRESS is our custom running state).
CELERY_STATES = {
    "PENDING": Status.QUEUED,
    "RECEIVED": Status.QUEUED,
    "STARTED": Status.RUNNING,
    "PROGRESS": Status.RUNNING,
    "RETRY": Status.RUNNING,
    "SUCCESS": Status.SUCCEEDED,
    "FAILURE": Status.FAILED,
    "REVOKED": Status.CANCELLED,
}


def owner_key_for(user: Any = None, session_key: str | None = None) -> str:
    """The one string that names an owner: ``user:<pk>`` or ``session:<key>``."""
    if user is not None and user.is_authenticated:
        return f"user:{user.pk}"
    if session_key:
        return f"session:{session_key}"
    raise ValueError("a job needs an owner: a user or a session key")


class JobQuerySet(models.QuerySet):
    def owned_by(self, owner_key: str) -> JobQuerySet:
        return self.filter(owner_key=owner_key)

    def active(self) -> JobQuerySet:
        return self.filter(status__in=ACTIVE_STATUSES)

    def waiting(self) -> JobQuerySet:
        """Queued and not being cancelled: what counts against the per-owner cap."""
        return self.filter(status=Status.QUEUED, cancel_requested_at__isnull=True)


class Job(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    model = models.CharField(max_length=50, db_index=True)
    input = models.JSONField(default=dict, help_text="the request's input, images left out")
    input_file = models.FileField(upload_to="jobs/%Y/%m/%d/", blank=True,
                                  help_text="an uploaded or drawn image (Django storage, never etcd)")
    fingerprint = models.CharField(max_length=64, help_text="sha256 of the validated input")
    priority = models.PositiveSmallIntegerField(default=5)
    queue = models.CharField(max_length=50, default=MODEL_QUEUE)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.QUEUED)
    progress = models.PositiveSmallIntegerField(default=0)
    partial = models.JSONField(null=True, blank=True, help_text="partial result while running")
    result = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE)
    session_key = models.CharField(max_length=40, blank=True)
    owner_key = models.CharField(max_length=60, db_index=True)
    client_address = models.GenericIPAddressField(null=True, blank=True,
                                                  help_text="where an anonymous request came from (abuse cap)")
    worker = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    cancel_requested_at = models.DateTimeField(null=True, blank=True)
    revision = models.BigIntegerField(default=0, help_text="etcd revision of the last state applied")

    objects = JobQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["queue", "status", "priority", "created_at"], name="job_queue_order")]
        constraints = [
            models.UniqueConstraint(
                fields=["owner_key", "model", "fingerprint"],
                condition=Q(status__in=ACTIVE_STATUSES, cancel_requested_at__isnull=True),
                name="one_active_job_per_input",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.model} {self.id} ({self.status})"

    @property
    def is_final(self) -> bool:
        return self.status in FINAL_STATUSES

    @property
    def is_training(self) -> bool:
        """A ``train_model`` job (its ``model`` is the model being trained)."""
        return self.owner_key == TRAINING_OWNER

    @property
    def duration(self) -> timedelta | None:
        if self.started_at is None:
            return None
        return (self.finished_at or timezone.now()) - self.started_at

    def jobs_ahead(self) -> int | None:
        """Queued jobs that a worker takes before this one (None unless this one waits)."""
        if self.status != Status.QUEUED:
            return None
        ahead = Q(priority__gt=self.priority) | Q(priority=self.priority, created_at__lt=self.created_at)
        return Job.objects.filter(queue=self.queue).waiting().filter(ahead).count()

    def to_dict(self, *, position: bool = True) -> dict[str, Any]:
        task = str(self.id)
        data = {
            "id": task,
            "model": self.model,
            "kind": "train" if self.is_training else "run",
            "status": self.status,
            "progress": self.progress,
            "priority": self.priority,
            "input": self.input,
            "input_url": reverse("jobs:job-input", args=[task]) if self.input_file else None,
            "partial": self.partial,
            "result": self.result,
            "error": self.error,
            "worker": self.worker,
            "cancel_requested": self.cancel_requested_at is not None,
            "created_at": _iso(self.created_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
            "status_url": reverse("jobs:job", args=[task]),
            "events_url": reverse("jobs:job-events", args=[task]),
        }
        if position:
            data["jobs_ahead"] = self.jobs_ahead()
        return data


def _iso(value) -> str | None:
    return value.isoformat() if value else None


class ApiToken(models.Model):
    """A bearer token for scripts: ``Authorization: Bearer dhw_...``. Only its hash is stored."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, blank=True)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now)
    last_used_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.user} {self.name or self.key_hash[:8]}"

    @staticmethod
    def hash(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    @classmethod
    def issue(cls, user, name: str = "") -> tuple[ApiToken, str]:
        """Create a token; returns it and the only copy of its secret key."""
        key = TOKEN_PREFIX + secrets.token_urlsafe(30)
        return cls.objects.create(user=user, name=name, key_hash=cls.hash(key)), key
