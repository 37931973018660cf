"""A get() receives what it waits for, never misses it, and nothing else (one watch hub per process)."""
from __future__ import annotations

import threading
import uuid

from celery import group, states

from etcd_broker.backend.result_backend import HUB_LABEL
from tests.backend.conftest import task
from tests.helpers import wait_until

ROUNDS = 300


def new_id(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}"


def test_a_result_stored_before_the_wait_is_returned_every_time(results_app):
    # The worker finishes before the caller waits, i.e. before etcd confirms the caller's watch:
    # the read made once etcd confirms the watch finds it.
    backend = results_app.backend
    for number in range(ROUNDS):
        task_id = new_id("early")
        backend.store_result(task_id, number, states.SUCCESS)
        assert results_app.AsyncResult(task_id).get(timeout=10) == number


def test_a_result_written_while_the_watch_is_being_created_is_never_missed(results_app):
    backend = results_app.backend
    for number in range(ROUNDS):
        task_id = new_id("race")
        writer = threading.Thread(target=backend.store_result, args=(task_id, number, states.SUCCESS))
        writer.start()
        assert results_app.AsyncResult(task_id).get(timeout=10) == number
        writer.join()


def test_a_get_on_a_task_published_elsewhere_reads_what_is_stored(results_app):
    results_app.backend.store_result("elsewhere", 42, states.SUCCESS)
    assert results_app.AsyncResult("elsewhere").get(timeout=10) == 42


def test_a_waiter_receives_the_writes_of_its_task_and_no_other(results_app):
    backend = results_app.backend
    hub = backend.store.hub
    waited, other = new_id("waited"), new_id("other")
    seen: list[str] = []
    done = threading.Event()

    def wait() -> None:
        results_app.AsyncResult(waited).get(timeout=30, on_message=lambda m: seen.append(m["status"]))
        done.set()

    before = hub.events_delivered(HUB_LABEL)
    waiter = threading.Thread(target=wait)
    waiter.start()
    backend.store_result(waited, {"progress": 10}, "PROGRESS")
    wait_until(lambda: seen == ["PROGRESS"], timeout=10, message="the waiter saw its first PROGRESS")
    for percent in range(1, 51):  # another task's progress, while the waiter's watch is live
        backend.store_result(other, {"progress": percent}, "PROGRESS")
    backend.store_result(other, "other's result", states.SUCCESS)
    backend.store_result(waited, "mine", states.SUCCESS)
    waiter.join(timeout=30)
    assert done.is_set() and seen == ["PROGRESS", "SUCCESS"]
    assert backend.store.read(other)[0] is not None  # the other task's 51 writes did happen
    # ... and none of them reached this process: its own SUCCESS did, and its PROGRESS too
    # unless that came through the read made when etcd confirmed the watch.
    assert hub.events_delivered(HUB_LABEL) - before in (1, 2)


def test_a_process_waiting_on_one_task_gets_no_events_of_a_task_a_worker_runs_meanwhile(worker_app):
    backend = worker_app.backend
    hub = backend.store.hub
    before = hub.events_delivered(HUB_LABEL)  # the transport's subscriptions share the hub
    # Submitted and never waited on: its result object is dropped at once, as a web view does.
    busy_id = task(worker_app, "count_with_progress", 20, 0.01).apply_async().id
    assert task(worker_app, "add", 2, 3).apply_async().get(timeout=30) == 5
    wait_until(lambda: (stored := backend.store.read(busy_id)[0]) is not None
               and b'"SUCCESS"' in stored.value, timeout=30, message="the busy task finished")
    # add's SUCCESS at most (it may come through the read instead); none of the busy task's 21 writes
    assert hub.events_delivered(HUB_LABEL) - before <= 1


def test_a_process_holding_two_results_follows_the_results_prefix(worker_app):
    # The rule's other side: a process awaiting several results at once (here one sent and
    # still held, one in get()) shares one subscription of the results prefix, so it also
    # receives writes of tasks it is not waiting on at the moment, and keeps or drops them.
    backend = worker_app.backend
    hub = backend.store.hub
    held = task(worker_app, "add", 1, 1).apply_async()  # held, not waited on yet
    assert task(worker_app, "add", 2, 3).apply_async().get(timeout=30) == 5  # two awaited: the prefix
    assert backend.result_consumer.following_prefix
    before = hub.events_delivered(HUB_LABEL)
    busy = task(worker_app, "count_with_progress", 20, 0.01).apply_async()  # sent while the prefix is live
    wait_until(lambda: (stored := backend.store.read(busy.id)[0]) is not None
               and b'"SUCCESS"' in stored.value, timeout=30, message="the busy task finished")
    assert hub.events_delivered(HUB_LABEL) - before >= 21  # its 20 PROGRESS and SUCCESS, none awaited
    assert busy.get(timeout=30) == 20 and held.get(timeout=30) == 2


def test_hundreds_of_results_from_a_real_worker_all_arrive(worker_app):
    for number in range(ROUNDS // 2):
        assert task(worker_app, "add", number, 1).apply_async().get(timeout=30) == number + 1
    results = group(task(worker_app, "add", n, n) for n in range(ROUNDS // 2)).apply_async()
    assert results.get(timeout=60) == [2 * n for n in range(ROUNDS // 2)]
