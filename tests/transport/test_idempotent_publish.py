"""Idempotent publish (channel.py): a publish retried after an ambiguous failure is stored once.

Real etcd. The fault: the publish's transaction reaches etcd and is committed, then its caller
gets DEADLINE_EXCEEDED instead of the answer (the client's own error mapping, as for a real
timeout: endpoint failed over, ``ConnectionTimeoutError`` raised), so kombu's ``ensure``
(``retry=True``, Celery's publish retry) publishes again. Checked for each publish path: plain,
TTL, ``x-max-length`` (drop-head and reject-publish), ETA (delayed), hand-off to a parked consumer,
``Producer.batch()``, a Celery ``send_task``, and a retry that comes after a consumer already
took and acked the first copy. With ``idempotent_publish=False`` the same fault stores two
copies, so the fault is real.
"""
from __future__ import annotations

from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from celery import Celery
from kombu import Connection, Exchange, Queue

from etcd_broker.core import ops
from etcd_broker.core.client import get_client
from etcd_broker.core.ops import KeySpace
from etcd_broker.transport.channel import marker_lease
from etcd_broker.transport.delivery import IDLE, waiting
from tests.helpers import wait_until
from tests.transport.test_handoff import hub_consumer, parks, run_until

#: kombu's retry policy for the publishes here: retry at once, a few times.
RETRY = {"max_retries": 3, "interval_start": 0, "interval_step": 0.1, "interval_max": 0.2}
#: Celery's own callback retry does not reconnect: wait out the client's skip of a failed endpoint (0.5 s).
CALLBACK_RETRY = {"max_retries": 3, "interval_start": 1, "interval_step": 0.5, "interval_max": 2}


class _DeadlineExceeded(grpc.RpcError):
    """What gRPC raises when a call's deadline passes before the answer came."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.DEADLINE_EXCEEDED

    def details(self) -> str:
        return "Deadline Exceeded"


def _puts(request) -> list[bytes]:
    """Every key a TxnRequest puts, nested transactions included."""
    keys = []
    for op in [*request.success, *request.failure]:
        if op.HasField("request_put"):
            keys.append(op.request_put.key)
        elif op.HasField("request_txn"):
            keys.extend(_puts(op.request_txn))
    return keys


@contextmanager
def answer_lost(client, monkeypatch, queue_dir: bytes, after_commit=lambda: None):
    """The first transaction that writes under ``queue_dir`` is committed, then its answer is lost:
    ``after_commit()`` runs, and the caller gets the client's error for DEADLINE_EXCEEDED."""
    fired: list = []
    original = client.call

    def call(method, request, **kwargs):
        response = original(method, request, **kwargs)
        if not fired and method == "Txn" and any(queue_dir in key for key in _puts(request)):
            fired.append(response)
            after_commit()
            client._manage_grpc_errors(_DeadlineExceeded())
        return response

    monkeypatch.setattr(client, "call", call)
    yield fired
    monkeypatch.setattr(client, "call", original)


def copies(client, keys: KeySpace, queue: str) -> dict[str, int]:
    """Stored copies of messages of ``queue``: waiting, claimed, delayed."""
    return {where: ops.get(client, f"{keys.queue(queue)}{where}/", prefix=True, count_only=True).count
            for where in ("ready", "unacked", "delayed")}


@pytest.fixture
def setup(etcd_url, etcd_prefix):
    client, keys = get_client(etcd_url), KeySpace(etcd_prefix)
    opened: list[Connection] = []

    def connect(**options) -> Connection:
        conn = Connection(etcd_url, transport_options={"prefix": etcd_prefix, **options})
        opened.append(conn)
        return conn

    yield client, keys, connect
    for conn in opened:
        conn.close()


def queue_dir(keys: KeySpace, queue: str) -> bytes:
    return keys.queue(queue).encode()


PATHS = {
    "plain": ({}, {}, "ready"),
    "ttl": ({}, {"expiration": 60}, "ready"),
    "max-length drop-head": ({"x-max-length": 5}, {}, "ready"),
    "max-length reject-publish": ({"x-max-length": 1, "x-overflow": "reject-publish"}, {}, "ready"),
    "eta (delayed)": ({}, {"headers": {"eta": "FUTURE"}}, "delayed"),
}


@pytest.mark.parametrize("path", list(PATHS))
def test_a_publish_retried_after_its_answer_was_lost_is_stored_once(setup, monkeypatch, path):
    client, keys, connect = setup
    arguments, options, where = PATHS[path]
    if "headers" in options:
        eta = (datetime.now(UTC) + timedelta(seconds=60)).isoformat()
        options = {**options, "headers": {"eta": eta}}
    name = "idem-" + "".join(c if c.isalnum() else "-" for c in path)
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name, queue_arguments=arguments or None)
    producer = connect().Producer(serializer="json")
    with answer_lost(client, monkeypatch, queue_dir(keys, name)) as fired:
        producer.publish({"n": 1}, exchange=queue.exchange, routing_key=name, declare=[queue], retry=True,
                         retry_policy=RETRY, **options)
    assert fired, "the fault never struck"
    stored = copies(client, keys, name)
    assert stored[where] == 1 and sum(stored.values()) == 1, f"stored {stored}"


def test_without_idempotent_publish_the_same_fault_stores_twice(setup, monkeypatch):
    client, keys, connect = setup
    producer = connect(idempotent_publish=False).Producer(serializer="json")
    with answer_lost(client, monkeypatch, queue_dir(keys, "idem-off")) as fired:
        producer.publish({"n": 1}, routing_key="idem-off", declare=[Queue("idem-off")], retry=True,
                         retry_policy=RETRY)
    assert fired
    assert copies(client, keys, "idem-off")["ready"] == 2


def test_a_retry_after_the_first_copy_was_consumed_and_acked_stores_nothing(setup, monkeypatch):
    client, keys, connect = setup
    consumer = connect().SimpleQueue("idem-taken")
    taken: list = []

    def take_and_ack():
        message = consumer.get(timeout=20)
        taken.append(message.payload)
        message.ack()
        wait_until(lambda: sum(copies(client, keys, "idem-taken").values()) == 0, timeout=20,
                   message="the first copy acked")

    producer = connect().Producer(serializer="json")
    with answer_lost(client, monkeypatch, queue_dir(keys, "idem-taken"), after_commit=take_and_ack) as fired:
        producer.publish({"n": 1}, routing_key="idem-taken", retry=True, retry_policy=RETRY)
    assert fired and taken == [{"n": 1}]
    assert copies(client, keys, "idem-taken") == {"ready": 0, "unacked": 0, "delayed": 0}


def test_a_failed_publish_whose_headers_are_reused_for_another_body_is_a_new_publish(setup, monkeypatch):
    client, keys, connect = setup
    producer = connect().Producer(serializer="json")
    producer.maybe_declare(Queue("idem-reuse"))
    headers = {"x-app": "same dict"}
    with answer_lost(client, monkeypatch, queue_dir(keys, "idem-reuse")) as fired:
        with pytest.raises(Exception):  # noqa: B017 - no retry: the caller sees the lost answer
            producer.publish({"n": 1}, routing_key="idem-reuse", headers=headers)
    assert fired
    producer.publish({"n": 2}, routing_key="idem-reuse", headers=headers, retry=True, retry_policy=RETRY)
    assert copies(client, keys, "idem-reuse")["ready"] == 2


def test_a_publish_whose_marker_lease_is_gone_takes_a_new_one(setup):
    client, keys, connect = setup
    producer = connect().Producer(serializer="json")
    producer.publish({"n": 1}, routing_key="idem-lease", declare=[Queue("idem-lease")])
    client.revoke_lease(marker_lease(client))  # the pool's current marker lease: etcd forgets it
    producer.publish({"n": 2}, routing_key="idem-lease")
    assert copies(client, keys, "idem-lease")["ready"] == 2


def test_a_batch_flush_whose_answer_was_lost_is_sent_again_and_stored_once(setup, monkeypatch):
    client, keys, connect = setup
    producer = connect().Producer(serializer="json")
    producer.maybe_declare(Queue("idem-batch"))
    with answer_lost(client, monkeypatch, queue_dir(keys, "idem-batch")) as fired:
        with producer.batch():
            for n in range(5):
                producer.publish({"n": n}, routing_key="idem-batch")
    assert fired
    assert copies(client, keys, "idem-batch")["ready"] == 5


def test_a_celery_send_task_retried_after_its_answer_was_lost_is_stored_once(setup, monkeypatch, etcd_url,
                                                                                  etcd_prefix):
    client, keys, _ = setup
    app = Celery("idem", broker=etcd_url, broker_transport_options={"prefix": etcd_prefix},
                 task_publish_retry_policy=RETRY)
    try:
        with answer_lost(client, monkeypatch, queue_dir(keys, "idem-celery")) as fired:
            app.send_task("idem.task", queue="idem-celery")
        assert fired
        assert copies(client, keys, "idem-celery")["ready"] == 1
    finally:
        app.close()


def test_a_celery_callback_publish_retried_after_its_answer_was_lost_is_stored_once(setup, monkeypatch, etcd_url,
                                                                                   etcd_prefix):
    """A worker publishes a chord callback or link through ``AMQP._retry_publish`` (celery/app/trace.py):
    Celery retries that one with ``retry_over_time(producer.publish, ...)``, a new ``publish`` call,
    so new properties, each time (the chaos test saw a callback run twice this way)."""
    client, keys, _ = setup
    app = Celery("idem", broker=etcd_url, broker_transport_options={"prefix": etcd_prefix},
                 task_publish_retry_policy=CALLBACK_RETRY)
    try:
        with answer_lost(client, monkeypatch, queue_dir(keys, "idem-callback")) as fired:
            app.amqp._retry_publish(app.send_task, "idem.task", queue="idem-callback")
        assert fired
        assert copies(client, keys, "idem-callback")["ready"] == 1
    finally:
        app.close()


def test_a_handoff_retried_after_its_answer_was_lost_is_stored_once(setup, monkeypatch, etcd_url, etcd_prefix):
    client, keys, _ = setup
    queue = Queue("idem-park", Exchange("idem-park", type="direct"), routing_key="idem-park")
    received: list[int] = []
    with hub_consumer(etcd_url, etcd_prefix, queue, 4,
                      lambda body, message: (received.append(body["n"]), message.ack())) as (_, loop, _c, producer):
        producer.publish({"n": 0}, exchange=queue.exchange, routing_key="idem-park", declare=[queue])
        run_until(loop, lambda: received == [0], "message 0 delivered")
        run_until(loop, lambda: waiting("idem-park"), "the producer saw the consumer park")
        with answer_lost(client, monkeypatch, queue_dir(keys, "idem-park")) as fired:
            producer.publish({"n": 1}, exchange=queue.exchange, routing_key="idem-park", retry=True,
                             retry_policy=RETRY)
        assert fired
        (park,) = parks(client, keys, "idem-park")
        assert park[0] != IDLE, "message 1 was not handed to the parked consumer"
        assert copies(client, keys, "idem-park") == {"ready": 0, "unacked": 1, "delayed": 0}
        run_until(loop, lambda: received == [0, 1], "message 1 delivered")
