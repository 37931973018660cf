"""The tests' PostgreSQL: one throwaway server per test process (scripts/postgres_server.py),
started on first use and stopped at exit; fresh databases on it; Django pointed at it.

``TEST_DATABASE_URL=postgres://user@host:port/name`` uses a server you run instead (CI with a
database service); that server must let the user create databases. ``TEST_DATABASE_URL=sqlite``
leaves Django on SQLite (a machine without PostgreSQL, or to compare).
"""
from __future__ import annotations

import atexit
import os
import uuid
from urllib.parse import urlsplit, urlunsplit

from scripts.postgres_server import PostgresServer

#: Environment variable naming an existing server to use instead of starting one.
EXTERNAL_VARIABLE = "TEST_DATABASE_URL"
#: Database name Django is given; pytest-django creates and drops ``test_<name>`` beside it.
DJANGO_DATABASE = "deephardway"

_server: PostgresServer | None = None


def server() -> PostgresServer:
    """This process's server, started on the first call."""
    global _server
    if _server is None:
        _server = PostgresServer().start()
        atexit.register(_server.cleanup)
    return _server


def base_url() -> str:
    """A URL of the server (database part to be replaced): the external one, or ours."""
    return os.environ.get(EXTERNAL_VARIABLE) or server().url()


def fresh_database(prefix: str = "t") -> str:
    """Create an empty database with a unique name; returns its ``DATABASE_URL``."""
    import psycopg
    from psycopg import sql

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(base_url(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return _with_database(base_url(), name)


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


def use_for_django() -> str:
    """Point Django's default database at PostgreSQL, before any connection is opened; returns its URL.

    Settings are already loaded when conftests run (pytest-django loads them first), so the
    ``default`` entry is replaced in place and the connection handler's cached copy dropped.
    """
    import dj_database_url
    from django.conf import settings
    from django.db import connections

    if os.environ.get(EXTERNAL_VARIABLE) == "sqlite":
        return settings.DATABASES["default"]["NAME"]
    url = _with_database(base_url(), DJANGO_DATABASE)
    default = settings.DATABASES["default"]
    default.clear()
    default.update(dj_database_url.parse(url, conn_max_age=0))
    connections.__dict__.pop("settings", None)  # a cached_property: re-read on next use
    try:
        del connections["default"]  # a wrapper made with the old settings (none opened yet)
    except AttributeError:
        pass
    return url
