"""Messages forged straight into etcd (no Celery producer) cannot make a worker run code.

An attacker with write access to a queue's keys can put anything there. Workers accept
JSON only: a pickle that would create a file if it were ever unpickled is refused, a
task name that is not registered is refused, bytes that are not a message are
dead-lettered, and the worker goes on to run the next real task.
"""
from __future__ import annotations

import base64
import json
import pickle
import uuid
from pathlib import Path

import pytest
from celery import Celery
from kombu import Connection
from kombu.exceptions import ContentDisallowed

import etcd_broker  # noqa: F401
from etcd_broker.core.client import get_client
from etcd_broker.core.ops import KeySpace, Sequence
from tests.helpers import wait_until
from tests.reliability import counting_app
from tests.reliability.counting import read_markers

pytestmark = pytest.mark.usefixtures("release_clients")
APP = "tests.reliability.counting_app"
PICKLE = "application/x-python-serialize"


class CreatesFile:
    """Unpickling this opens (so creates) ``path``: proof that a pickle was loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def pickle_that_creates(path: Path) -> bytes:
    payload = pickle.dumps(((CreatesFile(str(path)),), {}, {}))
    pickle.loads(payload)[0][0].close()  # the payload is live: loading it does create the file
    assert path.exists()
    path.unlink()
    return payload


def forged_message(queue: str, task: str, body: bytes, content_type: str) -> dict:
    """A Celery protocol-2 message as the transport stores it, made by hand."""
    task_id = str(uuid.uuid4())
    return {
        "body": base64.b64encode(body).decode(), "content-encoding": "binary", "content-type": content_type,
        "headers": {"lang": "py", "task": task, "id": task_id, "root_id": task_id, "parent_id": None,
                    "group": None, "retries": 0, "timelimit": [None, None], "origin": "forger"},
        "properties": {"correlation_id": task_id, "delivery_mode": 2, "priority": 0, "body_encoding": "base64",
                       "delivery_info": {"exchange": "", "routing_key": queue}, "delivery_tag": str(uuid.uuid4())},
    }


def put_raw(url: str, prefix: str, queue: str, value: bytes) -> None:
    """Write straight into the queue's ready keys, as someone with etcd access could."""
    keys = KeySpace(prefix)
    get_client(url).put(keys.ready_message(queue, keys.position(0, Sequence().next())), value)


def queue_is_empty(url: str, prefix: str, queue: str) -> bool:
    """No message waiting or claimed (an idle worker's parked key, etcd_broker/transport/delivery.py, is no message)."""
    client, keys = get_client(url), KeySpace(prefix)
    return not any(True for where in (keys.ready(queue), keys.unacked(queue))
                   for _ in client.get_prefix(where, keys_only=True))


def test_a_kombu_consumer_refuses_a_pickle_without_loading_it(etcd_url, etcd_prefix, tmp_path):
    marker = tmp_path / "unpickled"
    body = pickle_that_creates(marker)
    put_raw(etcd_url, etcd_prefix, "plain", json.dumps(forged_message("plain", "any", body, PICKLE)).encode())
    with Connection(etcd_url, transport_options={"prefix": etcd_prefix}) as conn:
        queue = conn.SimpleQueue("plain", accept=["json"])
        with pytest.raises(ContentDisallowed, match="pickle"):
            queue.get(timeout=10)
        queue.close()
    assert not marker.exists()


def test_a_worker_runs_no_forged_message_and_goes_on_with_real_tasks(etcd_url, etcd_prefix, worker_factory,
                                                                      tmp_path):
    counting_app.configure(etcd_url, etcd_prefix)
    worker = worker_factory(app=APP, env=counting_app.worker_env(etcd_url, etcd_prefix))
    unpickled, shelled = tmp_path / "unpickled", tmp_path / "shelled"
    forgeries = [
        forged_message("celery", "tests.reliability.counting_app.work", pickle_that_creates(unpickled), PICKLE),
        forged_message("celery", "os.system", json.dumps([[f"touch {shelled}"], {}, {}]).encode(),
                       "application/json"),
    ]
    for message in forgeries:
        put_raw(etcd_url, etcd_prefix, "celery", json.dumps(message).encode())
    put_raw(etcd_url, etcd_prefix, "celery", b"\x80\x04not a message at all")
    real = counting_app.work.delay(0.0)

    client = get_client(etcd_url)
    wait_until(lambda: real.id in read_markers(client, etcd_prefix, "done"), timeout=30, message="the real task")
    wait_until(lambda: queue_is_empty(etcd_url, etcd_prefix, "celery"), timeout=15, message="forgeries gone")
    assert not unpickled.exists() and not shelled.exists()
    assert list(read_markers(client, etcd_prefix, "started")) == [real.id]
    dead = [value for value, _ in client.get_prefix(KeySpace(etcd_prefix).dead("celery"))]
    assert dead == [b"\x80\x04not a message at all"]
    assert worker.process.poll() is None
    for refusal in ("Refusing to deserialize untrusted content of type pickle", "unregistered task of type 'os.system'"):
        wait_until(lambda refusal=refusal: refusal in worker.log(), timeout=10, message=f"log says {refusal!r}")


def test_the_sites_model_worker_refuses_a_pickled_model_task(etcd_url, etcd_prefix, worker_factory, tmp_path):
    """The production app (``celery -A deephardway_site worker -Q gpu``), not a test app."""
    env = {"ETCD_URL": etcd_url, "CELERY_BROKER_URL": etcd_url, "CELERY_RESULT_BACKEND": etcd_url,
           "ETCD_PREFIX": etcd_prefix, "MODEL_DIR": str(tmp_path / "models")}
    worker = worker_factory(app="deephardway_site", env=env, queues="gpu", extra_args=["--without-heartbeat"])
    unpickled = tmp_path / "unpickled"
    message = forged_message("gpu", "jobs.tasks.run_model", pickle_that_creates(unpickled), PICKLE)
    put_raw(etcd_url, etcd_prefix, "gpu", json.dumps(message).encode())

    wait_until(lambda: "Refusing to deserialize untrusted content" in worker.log(), timeout=30,
               message="the worker saw the forgery")
    wait_until(lambda: queue_is_empty(etcd_url, etcd_prefix, "gpu"), timeout=15, message="forgery dropped")
    assert not unpickled.exists()
    app = Celery("probe", broker=etcd_url, set_as_current=False)
    app.conf.broker_transport_options = {"prefix": etcd_prefix}
    replies = app.control.inspect(timeout=5).ping() or {}
    app.close()
    assert any(name.startswith(worker.hostname.split("@")[0]) for name in replies)
