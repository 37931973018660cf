"""Real ``celery -A deephardway_site worker -Q gpu -P threads`` processes on the test etcd,
serving tiny models from a temp model dir, and a Celery client app in the test process."""
from __future__ import annotations

import pytest
from celery import Celery

from tests.ml.tiny import train_tiny

#: Worker threads in task tests (the batcher needs concurrent callers to batch anything).
WORKER_THREADS = 8


@pytest.fixture(scope="session")
def task_models(tmp_path_factory):
    """Tiny digits and text models; the text one wide enough that 1,000 characters take a while."""
    directory = tmp_path_factory.mktemp("task-models")
    train_tiny("digits", directory)
    from ml import text

    text.train(directory, epochs=1, limit=30_000, units=512)
    return directory


@pytest.fixture
def client(etcd_url, etcd_prefix):
    """A Celery app that sends tasks by name and reads results, as the web process does."""
    app = Celery("tasks-client", broker=etcd_url, backend=etcd_url, set_as_current=False)
    app.conf.update(broker_transport_options={"prefix": etcd_prefix},
                    result_backend_transport_options={"prefix": etcd_prefix},
                    task_serializer="json", result_serializer="json", accept_content=["json"],
                    task_routes={"jobs.tasks.*": {"queue": "gpu"}})
    yield app
    app.close()


@pytest.fixture
def model_worker(worker_factory, etcd_url, etcd_prefix, task_models):
    """Start a model worker for this test's etcd prefix (call it; extra env overrides)."""

    def start(model_dir=None, **env: str):
        full_env = {"ETCD_URL": etcd_url, "CELERY_BROKER_URL": etcd_url, "CELERY_RESULT_BACKEND": etcd_url,
                    "ETCD_PREFIX": etcd_prefix, "MODEL_DIR": str(model_dir or task_models),
                    "TF_CPP_MIN_LOG_LEVEL": "2", **env}
        return worker_factory(app="deephardway_site", env=full_env, queues="gpu",
                              concurrency=WORKER_THREADS, extra_args=["--without-heartbeat"])

    return start
