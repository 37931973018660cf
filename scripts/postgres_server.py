"""Start and stop a throwaway PostgreSQL server for tests and benchmarks (never a system service).

The binaries come from Debian's ``postgresql`` package (``/usr/lib/postgresql/<version>/bin``),
``PG_BIN`` or ``PATH``. The server runs on a free loopback port with its data in a temporary
directory, durability switched off (a test database is thrown away). PostgreSQL refuses to run
as root, so under root the server runs as ``nobody`` (``PG_USER`` to choose another user).
"""
from __future__ import annotations

import glob
import logging
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from scripts.etcd_server import free_port
from scripts.processes import STOP_TIMEOUT, log_tail, stop_process

logger = logging.getLogger(__name__)

#: How long a fresh server gets to accept connections (seconds): initdb is separate.
START_TIMEOUT = 60.0
#: The superuser initdb creates; tests connect as it without a password (trust, loopback only).
SUPERUSER = "postgres"
#: The unprivileged account the server runs as when we are root (PostgreSQL refuses root).
DEFAULT_RUN_AS = "nobody"
#: Durability off and room for a flood of gunicorn threads (each holds a connection).
SERVER_SETTINGS = {
    "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
    "max_connections": "300", "shared_buffers": "64MB",
}
INSTALL_HINT = (
    "No PostgreSQL server binaries (initdb, postgres) found. Install Debian's `postgresql` package "
    "(`bash scripts/system-deps.sh test` does, as root), or set PG_BIN to the directory holding them."
)


class PostgresNotFound(RuntimeError):
    """No PostgreSQL server binaries could be found."""


class PostgresStartError(RuntimeError):
    """initdb failed or the server did not come up."""


def _version_key(path: str) -> tuple[int, ...]:
    version = Path(path).parent.parent.name  # /usr/lib/postgresql/<version>/bin/initdb
    return tuple(int(part) for part in version.split(".") if part.isdigit())


def find_bin_dir() -> Path:
    """The directory with ``initdb`` and ``postgres``: ``PG_BIN``, Debian's newest, then ``PATH``."""
    env_dir = os.environ.get("PG_BIN")
    if env_dir:
        if (Path(env_dir) / "initdb").exists() and (Path(env_dir) / "postgres").exists():
            return Path(env_dir)
        raise PostgresNotFound(f"PG_BIN={env_dir!r} has no initdb and postgres. {INSTALL_HINT}")
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key)
    if debian:
        return Path(debian[-1]).parent
    on_path = shutil.which("initdb")
    if on_path and (Path(on_path).parent / "postgres").exists():
        return Path(on_path).parent
    raise PostgresNotFound(INSTALL_HINT)


def run_as() -> pwd.struct_passwd | None:
    """The account to run the server as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    name = os.environ.get("PG_USER", DEFAULT_RUN_AS)
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise PostgresStartError(f"PostgreSQL cannot run as root and there is no user {name!r} "
                                 "to run it as (set PG_USER to an existing unprivileged user)") from None


@dataclass
class PostgresServer:
    """One PostgreSQL server on loopback with a temporary data directory.

    >>> server = PostgresServer().start()
    >>> server.create_database("app")
    'postgres://postgres@127.0.0.1:40123/app'
    >>> server.cleanup()
    """

    host: str = "127.0.0.1"
    port: int = 0
    process: subprocess.Popen | None = None
    base_dir: Path = field(init=False)
    _account: pwd.struct_passwd | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.port = self.port or free_port(self.host)
        # /tmp itself, not pytest's tmp_path: that sits under a root-only (0700) directory.
        self.base_dir = Path(tempfile.mkdtemp(prefix="deephardway-pg-"))
        self._account = run_as()
        if self._account is not None:
            os.chown(self.base_dir, self._account.pw_uid, self._account.pw_gid)

    @property
    def data_dir(self) -> Path:
        return self.base_dir / "data"

    @property
    def log_path(self) -> Path:
        return self.base_dir / "postgres.log"

    def url(self, database: str = SUPERUSER) -> str:
        """A ``DATABASE_URL`` for ``database`` on this server."""
        return f"postgres://{SUPERUSER}@{self.host}:{self.port}/{database}"

    def _run(self, command: list[str], **kwargs) -> subprocess.Popen:
        """Start ``command`` as the server's account, in its directory, logging to postgres.log."""
        account = self._account
        with open(self.log_path, "ab") as log:
            return subprocess.Popen(
                command, cwd=self.base_dir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                user=account.pw_uid if account else None, group=account.pw_gid if account else None,
                extra_groups=[] if account else None,
                env={**os.environ, "HOME": str(self.base_dir), "LC_ALL": "C"}, **kwargs)

    def start(self) -> PostgresServer:
        """initdb (first time), start ``postgres`` and wait until it accepts connections."""
        if self.running:
            return self
        bin_dir = find_bin_dir()
        if not self.data_dir.exists():
            initdb = self._run([str(bin_dir / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER,
                                "--auth=trust", "--encoding=UTF8", "--no-locale", "--no-sync",
                                "--no-instructions"])
            if initdb.wait(START_TIMEOUT) != 0:
                raise PostgresStartError(f"initdb exited with {initdb.returncode}:\n{self.log_tail()}")
        settings = [arg for name, value in SERVER_SETTINGS.items() for arg in ("-c", f"{name}={value}")]
        logger.info("starting PostgreSQL on %s:%d (data %s)", self.host, self.port, self.data_dir)
        self.process = self._run([str(bin_dir / "postgres"), "-D", str(self.data_dir), "-h", self.host,
                                  "-p", str(self.port), "-k", str(self.base_dir), *settings])
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise PostgresStartError(f"postgres exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                psycopg.connect(self.url(), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                time.sleep(0.1)
        raise PostgresStartError(f"PostgreSQL did not accept connections within {timeout}s:\n{self.log_tail()}")

    def create_database(self, name: str) -> str:
        """Create an empty database and return its URL."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def log_tail(self, lines: int = 20) -> str:
        return log_tail(self.log_path, lines)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Fast shutdown (SIGINT: open sessions are ended), SIGKILL if it hangs."""
        stop_process(self.process, signal.SIGINT, timeout)

    def cleanup(self) -> None:
        """Stop and remove the data directory."""
        self.stop()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.cleanup()
