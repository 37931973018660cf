"""The held-back STARTED write (etcd_broker/backend/result_backend.py) with real threads."""
from __future__ import annotations

import threading
import time

from etcd_broker.backend.result_backend import DeferredStarted
from tests.helpers import wait_until


def test_it_writes_started_for_a_task_still_running_after_the_delay():
    written = threading.Event()
    DeferredStarted(0.05).hold("t1", written.set)
    assert written.wait(5)


def test_it_never_writes_started_for_a_task_that_finished_first():
    written: list[str] = []
    deferred = DeferredStarted(0.2)
    deferred.hold("t2", lambda: written.append("t2"))
    deferred.drop("t2")
    deferred.hold("t3", lambda: written.append("t3"))
    wait_until(lambda: written == ["t3"], timeout=5, message="only t3's STARTED written")
    time.sleep(0.3)
    assert written == ["t3"]


def test_a_drop_during_the_write_waits_for_it_so_started_lands_first():
    order: list[str] = []
    entered = threading.Event()

    def slow_started() -> None:
        entered.set()
        time.sleep(0.2)
        order.append("STARTED")

    deferred = DeferredStarted(0.01)
    deferred.hold("t4", slow_started)
    assert entered.wait(5)
    deferred.drop("t4")  # the task's SUCCESS write: it must come after STARTED
    order.append("SUCCESS")
    assert order == ["STARTED", "SUCCESS"]
