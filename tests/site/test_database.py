"""The site tests run on a real PostgreSQL (tests/site/conftest.py), not SQLite."""
from __future__ import annotations

import os

import pytest
from django.db import connection

from tests.postgres import EXTERNAL_VARIABLE


@pytest.mark.django_db
@pytest.mark.skipif(os.environ.get(EXTERNAL_VARIABLE) == "sqlite", reason=f"{EXTERNAL_VARIABLE}=sqlite chosen")
def test_it_runs_on_postgresql_with_advisory_locks():
    assert connection.vendor == "postgresql"
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_database(), pg_try_advisory_xact_lock(42)")
        database, locked = cursor.fetchone()
    assert database.startswith("test_") and locked is True
