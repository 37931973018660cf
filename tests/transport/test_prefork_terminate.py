"""Terminates on a real prefork worker with events on: every pool slot comes back (issue 18).

``revoke(terminate=True)`` kills the pool child running the task; billiard starts a new one,
which runs kombu's and Celery's after-fork clean-up on the connections it inherited. A child
that waited there on a lock of the parent's (the watch stream's) never sent billiard its UP
message: the worker logged "Timed out waiting for UP message", killed it, tried again, and
once every slot was gone it ran nothing while still answering pings. The revokes ask for a
reply (as Flower and ``celery control revoke`` do), so the worker's pooled publishing
connection follows the bindings watch that such a child used to block on.
"""
from __future__ import annotations

import json
import queue

import pytest

from etcd_broker.core.client import EtcdConfig
from etcd_broker.core.watch import hub_for
from tests.helpers import wait_until
from tests.transport.busy_app import client_app

APP = "tests.transport.busy_app"
#: A held task runs until it is terminated (each test ends by killing its worker).
HOLD_SECONDS = 600.0
#: One ordinary task is sent after every this many held ones.
ORDINARY_EVERY = 10
#: A new pool child on a loaded 2-core machine: fork, Celery's child set-up, the task's first etcd write.
SLOT_SECONDS = 60.0
#: Every this many revokes asks for the worker's reply (the others are fire and forget, as a loop of them would be).
REPLY_EVERY = 10
#: How long a revoke waits for its reply (a reply is not what this test checks).
REPLY_SECONDS = 2.0
#: What the worker logs when a new pool child never reports (the bug).
NO_UP_MESSAGE = "Timed out waiting for UP message"

VARIANTS = [
    pytest.param(4, [], 200, id="200-terminates"),
    pytest.param(2, ["--max-tasks-per-child", "1"], 20, id="max-tasks-per-child-1"),
    pytest.param(3, ["--autoscale", "3,1"], 20, id="autoscale"),
]


@pytest.fixture
def busy(etcd_url, etcd_prefix):
    """A client app on this test's etcd and prefix, plus a reader of the tasks' marker keys."""
    app = client_app(etcd_url, etcd_prefix, lease_ttl=10)
    yield app
    app.close()


class started_ids:
    """The task ids of the markers put under ``prefix`` from now on, pushed by a watch (no polling)."""

    def __init__(self, url: str, prefix: str) -> None:
        self.hub = hub_for(EtcdConfig.from_url(url))
        self.prefix = prefix
        self.ids: queue.Queue[str] = queue.Queue()

    def __enter__(self) -> queue.Queue[str]:
        self.watch = self.hub.subscribe(self.prefix, self._on_events, prefix=True, puts_only=True)
        assert self.hub.wait_created(self.watch, timeout=SLOT_SECONDS), "the markers' watch was not created"
        return self.ids

    def __exit__(self, *exc_info) -> None:
        self.hub.unsubscribe(self.watch)

    def _on_events(self, events) -> None:
        for event in events:
            self.ids.put(json.loads(event.kv.value)["task_id"])


@pytest.mark.parametrize(("slots", "extra_args", "terminates"), VARIANTS)
def test_every_pool_slot_runs_tasks_after_terminates(busy, worker_factory, etcd_url, etcd_prefix, slots,
                                                     extra_args, terminates):
    env = {"ETCD_TEST_URL": etcd_url, "ETCD_TEST_PREFIX": etcd_prefix, "ETCD_TEST_LEASE_TTL": "10"}
    worker = worker_factory(app=APP, env=env, pool="prefork", concurrency=slots, extra_args=["-E", *extra_args])
    node = worker.hostname.split("@")[0]
    held, ordinary, revoked = [], [], set()
    with started_ids(etcd_url, f"{etcd_prefix}/markers/held-started/") as started:
        for number in range(terminates):
            held.append(busy.send_task("busy.hold", ("held", HOLD_SECONDS)).id)
            if number % ORDINARY_EVERY == ORDINARY_EVERY - 1:
                ordinary.append(busy.send_task("busy.pid"))
        while len(revoked) < terminates:
            try:
                task_id = started.get(timeout=SLOT_SECONDS)
            except queue.Empty:
                pytest.fail(f"no held task started within {SLOT_SECONDS}s after {len(revoked)} terminates:\n"
                            f"{worker.log()[-3000:]}")
            # Some ask for a reply: its publish is what made the worker's pooled connection follow
            # the bindings watch that a new child used to wait on.
            busy.control.revoke(task_id, terminate=True, reply=len(revoked) % REPLY_EVERY == 0, limit=1,
                                timeout=REPLY_SECONDS)
            revoked.add(task_id)
    assert revoked == set(held)
    assert all(isinstance(result.get(timeout=SLOT_SECONDS), int) for result in ordinary)

    # Every slot runs tasks again: as many distinct children, each holding a task at the same time.
    final = [busy.send_task("busy.hold", ("final", HOLD_SECONDS)) for _ in range(slots)]
    started = wait_until(lambda: len(busy.markers("final-started")) == slots and busy.markers("final-started"),
                         timeout=SLOT_SECONDS, message=f"{slots} final tasks running at once")
    assert {row["task_id"] for row in started} == {result.id for result in final}
    assert len({row["pid"] for row in started}) == slots
    assert worker.process.pid not in {row["pid"] for row in started}
    assert busy.markers("held-done") == [], "a terminated task ran to its end"
    log = worker.log()
    assert NO_UP_MESSAGE not in log, f"{node}: a pool child never came up:\n{log[-3000:]}"
