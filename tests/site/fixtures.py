"""Fixtures for the site (imported by tests/site and tests/browser conftests): users, jobs made
straight in the database, drawings, and the project's Celery app pointed at the test etcd."""
from __future__ import annotations

import base64
import io
import subprocess
import uuid

import pytest
from PIL import Image, ImageDraw

from jobs.models import Job, Status, owner_key_for
from jobs.queues import GPU_QUEUE


@pytest.fixture(autouse=True)
def media_root(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_user("alice", password="pw-alice-123")


@pytest.fixture
def other_user(django_user_model):
    return django_user_model.objects.create_user("bob", password="pw-bob-123")


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_user("root", password="pw-root-123", is_staff=True,
                                                 is_superuser=True)


@pytest.fixture
def make_job():
    """A Job row as the API would create it (no task is sent)."""

    def make(owner=None, *, session_key: str = "", status: str = Status.QUEUED, model: str = "text",
             priority: int = 5, **fields) -> Job:
        key = owner_key_for(owner) if owner is not None else owner_key_for(session_key=session_key)
        defaults = {"input": {"mode": "generate", "prompt": "hello"}, "fingerprint": uuid.uuid4().hex}
        return Job.objects.create(model=model, owner=owner, session_key=session_key, owner_key=key,
                                  status=status, priority=priority, **{**defaults, **fields})

    return make


def png_data_url(draw) -> str:
    image = Image.new("L", (280, 280), 255)
    draw(ImageDraw.Draw(image))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture
def one_drawing() -> str:
    """A hand-drawn-looking "1": one thick vertical stroke."""
    return png_data_url(lambda d: d.line([(140, 40), (150, 240)], fill=0, width=24))


@pytest.fixture
def blank_drawing() -> str:
    return png_data_url(lambda d: None)


#: One key prefix for every site test in this session (the Celery app is configured once).
SITE_PREFIX = f"/site-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def site_app(etcd_server):
    from deephardway_site.celery import app

    app.conf.update(broker_url=etcd_server.url, result_backend=etcd_server.url,
                    broker_transport_options={"prefix": SITE_PREFIX},
                    result_backend_transport_options={"prefix": SITE_PREFIX})
    return app


@pytest.fixture
def site_celery(site_app, etcd_server, settings):
    """The project's Celery app on the test etcd, with an empty ``gpu`` queue."""
    settings.ETCD_URL = etcd_server.url
    settings.ETCD_PREFIX = SITE_PREFIX
    with site_app.connection_for_write() as conn:
        conn.default_channel.queue_declare(GPU_QUEUE)
        conn.default_channel.queue_purge(GPU_QUEUE)
    return site_app


@pytest.fixture
def queued_messages(site_celery):
    """Take every message waiting in the gpu queue: [{id, task, priority, args}], urgent first."""

    def take() -> list[dict]:
        found = []
        with site_celery.connection_for_write() as conn:
            queue = conn.SimpleQueue(GPU_QUEUE, no_ack=True)
            try:
                while True:
                    try:
                        message = queue.get(timeout=0.3)
                    except queue.Empty:
                        break
                    args, _kwargs, _embed = message.payload
                    found.append({"id": message.headers["id"], "task": message.headers["task"],
                                  "priority": message.properties.get("priority"), "args": args})
            finally:
                queue.close()
        return found

    return take


@pytest.fixture
def without_fashion_data(monkeypatch, settings, tmp_path):
    """As on a machine without the dataset-fashion-mnist package and no trained model."""
    from dataclasses import replace

    from ml.registry import MODELS

    settings.MODEL_DIR = tmp_path / "no-models"
    monkeypatch.setitem(MODELS, "fashion", replace(MODELS["fashion"],
                                                   data_check=lambda: (False, "Fashion-MNIST is not installed")))


#: Worker threads for end-to-end workers.
WORKER_THREADS = 4


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny digits, text and (if its data is installed) fashion models: 1 epoch on a subset."""
    from ml import datasets
    from tests.ml.tiny import train_tiny

    directory = tmp_path_factory.mktemp("site-models")
    train_tiny("digits", directory)
    train_tiny("text", directory)
    if datasets.fashion_available()[0]:
        train_tiny("fashion", directory)
    return directory


@pytest.fixture
def start_model_worker(site_celery, etcd_server, tiny_models, settings, tmp_path):
    """Start a real ``celery -A deephardway_site worker -Q gpu`` serving the tiny models."""
    from tests.helpers import WorkerProcess

    settings.MODEL_DIR = tiny_models
    started = []

    def start(**extra_env: str) -> WorkerProcess:
        env = {"ETCD_URL": etcd_server.url, "CELERY_BROKER_URL": etcd_server.url,
               "CELERY_RESULT_BACKEND": etcd_server.url, "ETCD_PREFIX": SITE_PREFIX,
               "MODEL_DIR": str(tiny_models), "TF_CPP_MIN_LOG_LEVEL": "2", **extra_env}
        worker = WorkerProcess(app="deephardway_site", env=env, queues="gpu", concurrency=WORKER_THREADS,
                               log_dir=tmp_path, extra_args=["--without-heartbeat"]).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        # Warm shutdown hands back what the worker still holds and revokes its lease; a SIGKILL
        # would leave prefetched messages under the lease, back in the shared gpu queue ~10 s
        # later, in the middle of another test.
        try:
            worker.terminate(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
