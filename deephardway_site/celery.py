"""The Celery app: broker and result backend on etcd, configured from Django settings.

Workers: ``celery -A deephardway_site worker -Q gpu,default``.
"""
from __future__ import annotations

import os

from celery import Celery

import etcd_broker  # noqa: F401 - registers the etcdv3:// transport and result backend

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "deephardway_site.settings")

app = Celery("deephardway_site")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
