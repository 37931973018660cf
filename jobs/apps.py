"""The jobs app: every request as a Job, its API, admin and Celery tasks."""
from __future__ import annotations

from django.apps import AppConfig


class JobsConfig(AppConfig):
    name = "jobs"
    default_auto_field = "django.db.models.BigAutoField"
