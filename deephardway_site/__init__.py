"""The deephardway Django project and its Celery app."""
from __future__ import annotations

from deephardway_site.celery import app as celery_app

__all__ = ["celery_app"]
