"""Library tests: etcd_broker with kombu, Celery and a real etcd, no Django (see no_django.py)."""
from __future__ import annotations

from tests.broker import no_django  # noqa: F401 - installs the blocker when Django is not loaded yet
