"""Native delayed delivery: ETA tasks wait in etcd until due, not in a worker (issue 20 item 1).

A task sent with ``countdown``/``eta`` is stored under ``delayed/`` and offered to consumers only
when due, in priority then FIFO order among those due together; a worker holds none of them
while they wait (``inspect scheduled`` is empty), runs each once, never before its due time,
and discards a task revoked while it waited. The mover outlives an unexpected error (issue 20 item 3).
"""
from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from celery import Celery, states
from kombu import Connection, Consumer, Queue

import etcd_broker  # noqa: F401 - registers etcdv3://
from etcd_broker.core.client import get_client
from etcd_broker.core.ops import KeySpace
from etcd_broker.stats import queue_stats
from etcd_broker.transport import delayed
from tests.helpers import wait_until
from tests.transport import marker_app
from tests.transport.test_busy_worker import APP as BUSY_APP
from tests.transport.test_busy_worker import busy  # noqa: F401 - a fixture
from tests.transport.test_celery_worker import APP, env_for, markers  # noqa: F401 - markers is a fixture

#: Countdown of the worker tests' tasks: long enough to ask the worker while they wait.
COUNTDOWN = 8.0


def _client_app(url: str, prefix: str, **options) -> Celery:
    app = Celery(f"delayed-{prefix}", broker=url, set_as_current=False)
    app.conf.update(broker_transport_options={"prefix": prefix, **options}, task_serializer="json",
                    accept_content=["json"])
    return app


def _stats(url: str, prefix: str, queue: str = "celery") -> dict:
    return {row["queue"]: row for row in queue_stats(get_client(url), KeySpace(prefix))}.get(queue, {})


def _drain(conn: Connection, count: int, timeout: float,
           consuming: Callable[[], None] = lambda: None) -> list[tuple[float, dict]]:
    """Consume ``count`` messages from the celery queue as a plain kombu consumer: (arrival, message).
    ``consuming`` runs once the consumer is registered (its transport follows the queue's delayed/)."""
    got: list[tuple[float, dict]] = []
    with Consumer(conn, [Queue("celery")], accept=["json"], no_ack=True,
                  callbacks=[lambda body, message: got.append((time.time(), message.headers))]):
        consuming()
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            try:
                conn.drain_events(timeout=1)
            except TimeoutError:
                pass
    return got


def test_tasks_due_together_wait_in_etcd_then_arrive_by_priority_then_in_order(etcd_url, etcd_prefix):
    app = _client_app(etcd_url, etcd_prefix)
    eta = datetime.now(UTC) + timedelta(seconds=3)
    sent = [app.send_task("t", args=(i,), eta=eta, priority=p).id for i, p in enumerate([0, 9, 0, 5, 9])]
    stats = _stats(etcd_url, etcd_prefix)
    assert (stats["delayed"], stats["ready"]) == (5, 0)
    assert stats["next_due"] == pytest.approx(eta.timestamp(), abs=0.001)
    with Connection(etcd_url, transport_options={"prefix": etcd_prefix}) as conn:
        got = _drain(conn, 5, timeout=60)
    assert [headers["id"] for _, headers in got] == [sent[1], sent[4], sent[3], sent[0], sent[2]]
    assert min(arrived for arrived, _ in got) >= eta.timestamp()  # never offered before due
    assert _stats(etcd_url, etcd_prefix)["delayed"] == 0
    app.close()


def test_the_mover_finds_the_next_due_time_beyond_its_look_ahead_windows(etcd_url, etcd_prefix):
    """The mover reads the next due time in widening windows (etcd visits every key of a range it
    counts): a task due within a second, and one due after the last window, are both found."""
    app = _client_app(etcd_url, etcd_prefix)
    soon = datetime.now(UTC) + timedelta(seconds=2)
    sent = [app.send_task("t", eta=at).id for at in (soon, soon + timedelta(seconds=0.5))]
    late = soon + timedelta(seconds=delayed.LOOK_AHEAD[-2] + 60)
    app.send_task("t", eta=late)
    with Connection(etcd_url, transport_options={"prefix": etcd_prefix}) as conn:
        got = _drain(conn, 2, timeout=60)
        mover = conn.transport.delayed
        mover.follow("celery")  # as a consumer does (the drain's consumer has gone: it unfollowed)
        wait_until(lambda: mover.next_due("celery") == pytest.approx(late.timestamp(), abs=0.001),
                   timeout=30, message="the mover knows the task due after its windows")
    assert [headers["id"] for _, headers in got] == sent
    assert min(arrived for arrived, _ in got) >= soon.timestamp()
    assert _stats(etcd_url, etcd_prefix)["delayed"] == 1
    app.close()


def test_the_mover_goes_on_after_an_unexpected_error(etcd_url, etcd_prefix, caplog):
    """A key under delayed/ with no due time in it makes the mover's read of the next due time raise:
    the mover logs, backs off, and still moves the next task when it is due. One put while it
    follows the queue is ignored by its watch callback (raising there restarts the watch stream)."""
    client = get_client(etcd_url)
    junk = KeySpace(etcd_prefix).delayed("celery") + "junk"  # sorts after every due time: read as the next due
    client.put(junk, b"{}")
    caplog.set_level(logging.WARNING, logger="etcd_broker")
    app = _client_app(etcd_url, etcd_prefix)
    sent = []

    def fail_once_then_send() -> None:
        wait_until(lambda: "not moved" in caplog.text, timeout=30, message="the mover met the junk key")
        client.put(junk + "2", b"{}")
        wait_until(lambda: "ignoring" in caplog.text, timeout=30, message="the watch callback saw the junk put")
        client.delete_prefix(junk)
        eta = datetime.now(UTC) + timedelta(seconds=2)
        sent.append((app.send_task("t", eta=eta).id, eta.timestamp()))

    with Connection(etcd_url, transport_options={"prefix": etcd_prefix}) as conn:
        got = _drain(conn, 1, timeout=60, consuming=fail_once_then_send)
    assert [headers["id"] for _, headers in got] == [sent[0][0]]
    assert got[0][0] >= sent[0][1]  # never offered before due
    assert "watch stream failed" not in caplog.text
    app.close()


def test_with_delayed_delivery_off_an_eta_task_goes_to_ready_at_once(etcd_url, etcd_prefix):
    app = _client_app(etcd_url, etcd_prefix, delayed_delivery=False)
    app.send_task("t", countdown=60)
    stats = _stats(etcd_url, etcd_prefix)
    assert (stats["delayed"], stats["ready"]) == (0, 1)
    app.close()


@pytest.mark.parametrize("pool", ["threads", "prefork"])
def test_a_worker_holds_no_eta_task_and_runs_each_once_when_due(markers, worker_factory, etcd_url,  # noqa: F811
                                                                etcd_prefix, pool):
    worker = worker_factory(app=APP, env=env_for(etcd_url, etcd_prefix), pool=pool, concurrency=2)
    sent_at = time.time()
    for i in range(30):
        marker_app.record.apply_async(("due", i), countdown=COUNTDOWN)
    assert _stats(etcd_url, etcd_prefix)["delayed"] == 30
    inspect = marker_app.app.control.inspect(timeout=5, limit=1)
    assert inspect.scheduled() == {worker.hostname.replace("%h", socket.gethostname()): []}  # none in its memory
    ran = wait_until(lambda: len(markers("due")) >= 30 and markers("due"), timeout=60, message="30 ETA tasks ran")
    time.sleep(0.5)
    assert sorted(row["value"] for row in markers("due")) == list(range(30))  # each once
    assert min(row["at"] for row in ran) >= sent_at + COUNTDOWN


def test_a_task_revoked_before_its_due_time_never_runs(busy, worker_factory, etcd_url, etcd_prefix):  # noqa: F811
    worker_factory(app=BUSY_APP, env=env_for(etcd_url, etcd_prefix), concurrency=2)
    revoked = busy.send_task("busy.hold", ("revoked", 0), countdown=COUNTDOWN)
    busy.send_task("busy.hold", ("kept", 0), countdown=COUNTDOWN)
    busy.control.revoke(revoked.id)
    wait_until(lambda: busy.markers("kept-done"), timeout=60, message="the task not revoked ran")
    wait_until(lambda: revoked.state == states.REVOKED, timeout=30, message="the revoked task's state")
    assert busy.markers("revoked-started") == []

