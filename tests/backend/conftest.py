"""Fixtures for the result backend: Celery apps on this test's etcd, and one shared worker per module."""
from __future__ import annotations

import uuid

import pytest
from celery import Celery

import etcd_broker  # noqa: F401 - registers etcdv3://
from etcd_broker.backend.result_store import close_shared
from tests.helpers import WorkerProcess

#: The worker app; tasks are sent by name so this process never imports its module-level app.
WORKER_APP = "tests.celery_app"


def make_app(url: str, prefix: str, **conf) -> Celery:
    """A client-side Celery app shaped like tests/celery_app.py, on ``url`` under ``prefix``."""
    app = Celery(f"results-{prefix}", broker=url, backend=url, set_as_current=False)
    app.conf.update(
        broker_transport_options={"prefix": prefix},
        result_backend_transport_options={"prefix": prefix},
        task_serializer="json", result_serializer="json", accept_content=["json"],
        broker_connection_retry_on_startup=True, **conf,
    )
    return app


def worker_env(url: str, prefix: str, **extra: str) -> dict[str, str]:
    return {"ETCD_TEST_URL": url, "ETCD_TEST_PREFIX": prefix, **extra}


def task(app: Celery, name: str, *args, **options):
    """A signature of a tests/celery_app.py task, by name."""
    return app.signature(f"{WORKER_APP}.{name}", args=args, options=options)


@pytest.fixture(autouse=True)
def _close_result_streams():
    """Each test's watch streams end with it (a stopped private etcd would be retried forever)."""
    yield
    close_shared()


@pytest.fixture
def results_app(etcd_url, etcd_prefix):
    """An app with the etcd result backend and no worker (the backend's own API)."""
    app = make_app(etcd_url, etcd_prefix)
    yield app
    app.close()


@pytest.fixture(scope="module")
def module_prefix() -> str:
    return f"/tb-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def shared_worker(etcd_server, module_prefix, tmp_path_factory):
    """One real ``celery worker -P threads -c 4`` (broker and backend on etcd) for a test module."""
    worker = WorkerProcess(app=WORKER_APP, env=worker_env(etcd_server.url, module_prefix), concurrency=4,
                           log_dir=tmp_path_factory.mktemp("worker")).start()
    yield worker
    try:
        worker.terminate(timeout=15)
    finally:
        worker.kill()


@pytest.fixture
def worker_app(etcd_server, module_prefix, shared_worker):
    """A client app talking to the module's shared worker."""
    app = make_app(etcd_server.url, module_prefix)
    yield app
    app.close()
