"""Shared fixtures: a real etcd on a free loopback port, unique key prefixes, worker processes.

No Django here: the library's tests (tests/broker, transport, backend, kombu_integration) run
with ``import django`` blocked. pytest-django sets DJANGO_SETTINGS_MODULE for the site's tests
(pyproject.toml); setting it here would make Celery look for Django in the library's run.
"""
from __future__ import annotations

import os
import uuid

import pytest

from etcd_broker.core.client import forget_clients
from etcd_broker.transport.consumer import close_all_leases
from scripts.etcd_server import EtcdServer
from tests.helpers import WorkerProcess

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory):
    """One etcd for the session, on a free port with a temporary data dir."""
    server = EtcdServer(data_dir=str(tmp_path_factory.mktemp("etcd")))
    server.start()
    yield server
    close_all_leases()
    forget_clients()
    server.stop()


@pytest.fixture
def etcd_url(etcd_server) -> str:
    return etcd_server.url


@pytest.fixture
def etcd_prefix() -> str:
    """A key prefix no other test uses, so tests never see each other's keys."""
    return f"/t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def private_etcd(tmp_path):
    """An etcd that this test alone may stop, kill and restart."""
    server = EtcdServer(data_dir=str(tmp_path / "etcd"))
    server.start()
    yield server
    close_all_leases(ack_timeout=1.0)  # revoke while this etcd still answers
    server.stop()


@pytest.fixture
def worker_factory(tmp_path):
    """Start ``celery worker`` processes; every one still running is killed at the end."""
    started: list[WorkerProcess] = []

    def start(**kwargs) -> WorkerProcess:
        worker = WorkerProcess(log_dir=tmp_path, **kwargs).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.kill()


@pytest.fixture(scope="session")
def trained_digits(tmp_path_factory):
    """The real digits model (ml.digits.train, full recipe), trained once per session: the
    directory holding digits.keras and its card. Shared by tests/ml and tests/browser."""
    from ml import digits

    directory = tmp_path_factory.mktemp("digits-model")
    digits.train(directory)
    return directory
