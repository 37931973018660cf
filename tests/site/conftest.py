"""The site's fixtures (tests/site/fixtures.py, shared with tests/browser), on PostgreSQL.

Every site test runs on a real PostgreSQL (tests/postgres.py starts one on a free loopback port
with a temporary data directory): the database behaves as in production (row locks, advisory
locks, constraints). ``make run`` keeps SQLite as its zero-configuration default.
"""
from __future__ import annotations

from tests import postgres
from tests.site.fixtures import *  # noqa: F403


def pytest_configure(config):
    # whitenoise warns that STATIC_ROOT (var/static) is absent until collectstatic runs.
    config.addinivalue_line("filterwarnings", "ignore:No directory at:UserWarning")
    # Settings are loaded by now (pytest-django does that first): switch the database in place,
    # before any test opens a connection. Tests in the same session elsewhere use it too.
    postgres.use_for_django()
