"""The site tests run on a real PostgreSQL (tests/site/conftest.py), not SQLite."""
from __future__ import annotations

import pytest
from django.db import connection


@pytest.mark.django_db
def test_it_runs_on_postgresql_with_advisory_locks():
    assert connection.vendor == "postgresql"
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_database(), pg_try_advisory_xact_lock(42)")
        database, locked = cursor.fetchone()
    assert database.startswith("test_") and locked is True
