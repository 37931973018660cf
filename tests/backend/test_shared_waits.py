"""Several results awaited at once share one subscription of the results prefix; none is missed.

A lone waiter keeps its own subscription (test_waiters.py). These tests cover the other
mode: many threads each awaiting its own result, a burst of results sent and then awaited
in turn, and results written before the wait, before the prefix subscription, or while a
process switches between the two modes.
"""
from __future__ import annotations

import random
import threading
import time
import uuid

import pytest
from celery import states

from etcd_broker.backend import result_backend
from etcd_broker.backend.result_backend import HUB_LABEL
from etcd_broker.core import watch
from tests.backend.conftest import task
from tests.helpers import wait_until

#: Waiting threads in one process, and rounds each (every round a new task).
THREADS = 16
ROUNDS = 15


def new_id(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:8]}"


def await_in_thread(app, task_id: str, got: dict[str, object]) -> threading.Thread:
    """A thread whose get() of ``task_id`` puts the result in ``got``."""
    thread = threading.Thread(target=lambda: got.update({task_id: app.AsyncResult(task_id).get(timeout=20)}))
    thread.start()
    return thread


class CountedReads:
    """Counts the result store's batched reads (the waiters' only etcd requests besides watches)."""

    def __init__(self, monkeypatch, store) -> None:
        self.calls = 0
        original = store.read_many

        def read_many(ids):
            self.calls += 1
            return original(ids)

        monkeypatch.setattr(store, "read_many", read_many)


def test_many_threads_each_awaiting_its_own_result_all_arrive(results_app):
    backend = results_app.backend
    errors: list[str] = []
    used_prefix = threading.Event()

    def waiter(seed: int) -> None:
        rng = random.Random(seed)
        for number in range(ROUNDS):
            task_id = new_id(f"t{seed}")
            when = rng.choice(("before", "racing", "after"))
            if when == "before":
                backend.store_result(task_id, number, states.SUCCESS)
            writer = threading.Thread(target=backend.store_result, args=(task_id, number, states.SUCCESS))
            if when == "racing":
                writer.start()
            elif when == "after":
                threading.Timer(0.005, writer.start).start()
            if backend.result_consumer.following_prefix:
                used_prefix.set()
            value = results_app.AsyncResult(task_id).get(timeout=20)
            if value != number:
                errors.append(f"{task_id} ({when}): {value!r} != {number}")
            if when != "before":
                writer.join(timeout=20)

    threads = [threading.Thread(target=waiter, args=(seed,)) for seed in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and not any(thread.is_alive() for thread in threads)
    assert used_prefix.is_set()  # several waiters at once: the prefix subscription served them


def test_a_burst_of_results_is_read_in_a_few_batches_not_one_read_each(worker_app, monkeypatch):
    monkeypatch.setattr(result_backend, "PREFIX_LINGER", 60.0)  # however slow this machine is today
    backend = worker_app.backend
    reads = CountedReads(monkeypatch, backend.store)
    results = [task(worker_app, "add", n, 1).apply_async() for n in range(200)]
    wait_until(lambda: backend.store.read(results[-1].id)[0] is not None, timeout=60,
               message="the worker finished the burst")  # every result is stored before the first get()
    assert [result.get(timeout=30) for result in results] == [n + 1 for n in range(200)]
    # One subscription of the prefix, then the 200 sent tasks read ahead in batches of <= 128
    # (per-task subscriptions read each task once: 200 reads).
    assert reads.calls <= 5


def test_tasks_sent_once_the_prefix_is_confirmed_need_no_read(worker_app, monkeypatch):
    monkeypatch.setattr(result_backend, "PREFIX_LINGER", 60.0)  # however slow this machine is today
    backend = worker_app.backend
    held = task(worker_app, "add", 0, 0).apply_async()  # held: two results awaited from here
    assert task(worker_app, "add", 1, 1).apply_async().get(timeout=30) == 2
    assert backend.result_consumer.following_prefix
    reads = CountedReads(monkeypatch, backend.store)
    for n in range(30):
        assert task(worker_app, "add", n, 2).apply_async().get(timeout=30) == n + 2
    assert held.get(timeout=30) == 0
    assert reads.calls == 0  # every result came as an event of the prefix subscription


def test_a_result_stored_before_the_prefix_subscription_is_found(results_app):
    backend = results_app.backend
    for number in range(40):
        early, late = new_id("early"), new_id("late")
        backend.store_result(early, number, states.SUCCESS)  # before anything watches
        got: dict[str, object] = {}
        waiter = await_in_thread(results_app, late, got)
        assert results_app.AsyncResult(early).get(timeout=20) == number
        backend.store_result(late, number, states.SUCCESS)
        waiter.join(timeout=20)
        assert got == {late: number}


def test_a_result_stored_while_the_prefix_is_live_before_its_get_is_found(results_app):
    # Not sent from this process, so not covered by the subscription: its get() reads it.
    backend = results_app.backend
    holder = new_id("holder")
    waiter = threading.Thread(target=lambda: results_app.AsyncResult(holder).get(timeout=60))
    waiter.start()
    results_app.send_task("tests.celery_app.add", args=(1, 1))  # sent and dropped: not awaited
    for number in range(100):
        task_id = new_id("stored")
        backend.store_result(task_id, number, states.SUCCESS)
        assert results_app.AsyncResult(task_id).get(timeout=20) == number
    backend.store_result(holder, "done", states.SUCCESS)
    waiter.join(timeout=20)
    assert not waiter.is_alive()


@pytest.mark.parametrize("linger", [0.0, 0.05])
def test_results_racing_the_switch_between_modes_are_never_missed(results_app, monkeypatch, linger):
    # A lone waiter (its own subscription) is joined by a second one (the prefix starts),
    # both results racing the switch; then both end and, after the linger, a lone get()
    # subscribes its own key again, its result racing the prefix's end.
    monkeypatch.setattr(result_backend, "PREFIX_LINGER", linger)
    backend = results_app.backend
    modes = set()
    for number in range(60):
        first, second, third = new_id("first"), new_id("second"), new_id("third")
        got: dict[str, object] = {}
        waiter = await_in_thread(results_app, first, got)
        writers = [threading.Thread(target=backend.store_result, args=(task_id, number, states.SUCCESS))
                   for task_id in (first, second)]
        for writer in writers:
            writer.start()
        assert results_app.AsyncResult(second).get(timeout=20) == number
        modes.add(backend.result_consumer.following_prefix)
        waiter.join(timeout=20)
        assert got == {first: number}
        writer = threading.Thread(target=backend.store_result, args=(third, number, states.SUCCESS))
        writer.start()
        assert results_app.AsyncResult(third).get(timeout=20) == number
        for thread in (*writers, writer):
            thread.join(timeout=20)
    assert True in modes  # the switch did happen (in some rounds the first result came before it)


def test_the_prefix_subscription_ends_when_the_process_stops_awaiting_several(results_app, monkeypatch):
    monkeypatch.setattr(result_backend, "PREFIX_LINGER", 0.0)
    backend = results_app.backend
    a, b = new_id("a"), new_id("b")
    waiter = threading.Thread(target=lambda: results_app.AsyncResult(a).get(timeout=20))
    waiter.start()
    wait_until(lambda: backend.result_consumer.shared._own == 1, timeout=10, message="the first waiter waits")
    writer = threading.Timer(0.05, backend.store_result, args=(b, "b", states.SUCCESS))
    writer.start()
    assert results_app.AsyncResult(b).get(timeout=20) == "b"
    assert backend.result_consumer.following_prefix
    backend.store_result(a, "a", states.SUCCESS)
    waiter.join(timeout=20)
    lone = new_id("lone")
    backend.store_result(lone, "lone", states.SUCCESS)
    assert results_app.AsyncResult(lone).get(timeout=20) == "lone"
    assert not backend.result_consumer.following_prefix  # a lone waiter: its own subscription again


@pytest.mark.parametrize("compact", [False, True], ids=["resumed", "compacted"])
def test_prefix_waiters_get_results_written_while_the_stream_was_down(results_app, monkeypatch, compact):
    # The stream breaks and stays down for a second; the results are written meanwhile and,
    # in the compacted case, etcd compacts the revisions the prefix subscription would
    # resume from: it resyncs (the waiters are read again) instead of replaying them.
    monkeypatch.setattr(watch, "RECONNECT_FIRST_DELAY", 1.0)
    backend = results_app.backend
    shared = backend.result_consumer.shared
    resyncs: list[int] = []
    resync = shared._on_resync
    monkeypatch.setattr(shared, "_on_resync", lambda generation: resyncs.append(generation) or resync(generation))
    ids = [new_id("down") for _ in range(6)]
    got: dict[str, object] = {}
    threads = [threading.Thread(target=lambda t=t: got.update({t: results_app.AsyncResult(t).get(timeout=30)}))
               for t in ids]
    for thread in threads:
        thread.start()
    wait_until(lambda: shared._own + len(shared._consumers) == len(ids) and shared._live, timeout=10,
               message="every waiter waits (the first on its own key, the others on the prefix)")
    hub = backend.store.hub
    hub._stream._call.cancel()  # as a network break would
    wait_until(lambda: not hub.connected, timeout=10, message="the stream is down")
    for number, task_id in enumerate(ids):
        backend.store_result(task_id, number, states.SUCCESS)
    if compact:
        backend.store.client.compact(backend.store.current_revision())
    for thread in threads:
        thread.join(timeout=30)
    assert got == {task_id: number for number, task_id in enumerate(ids)}
    if compact:  # etcd reports the compaction from its 100 ms sync loop, maybe after the re-read
        wait_until(lambda: resyncs, timeout=10, message="the prefix subscription resynced")
        later = new_id("after-resync")  # and it still serves waiters afterwards
        writer = threading.Timer(0.05, backend.store_result, args=(later, "later", states.SUCCESS))
        writer.start()
        assert results_app.AsyncResult(later).get(timeout=20) == "later"
        writer.join()
    else:
        assert resyncs == []  # resumed from its next revision


def test_threads_awaiting_the_same_task_all_get_it_while_a_stray_handle_is_dropped(results_app):
    backend = results_app.backend
    shared_id, other = new_id("same"), new_id("other")
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(results_app.AsyncResult(shared_id).get(timeout=20)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    wait_until(lambda: len(backend.result_consumer.shared._consumers.get(shared_id, ())) >= 2, timeout=10,
               message="the task is awaited on the prefix by several threads")
    results_app.AsyncResult(shared_id).__del__()  # a handle dropped here (cancel_for from this thread)
    writer = threading.Timer(0.05, backend.store_result, args=(other, "other", states.SUCCESS))
    writer.start()
    assert results_app.AsyncResult(other).get(timeout=20) == "other"  # this thread's consume_from flushes it
    backend.store_result(shared_id, "same", states.SUCCESS)
    for thread in threads:
        thread.join(timeout=20)
    assert got == ["same"] * 3


def test_an_idle_process_stops_receiving_every_result_at_the_next_write(results_app, monkeypatch):
    # Nobody awaits here any more (and did not for PREFIX_LINGER): the next result written
    # anywhere ends the prefix subscription, without waiting for another get() here.
    monkeypatch.setattr(result_backend, "PREFIX_LINGER", 0.2)
    backend = results_app.backend
    hub = backend.store.hub
    first, second = new_id("first"), new_id("second")
    got: dict[str, object] = {}
    waiter = await_in_thread(results_app, first, got)
    writer = threading.Timer(0.05, backend.store_result, args=(second, 2, states.SUCCESS))
    writer.start()
    assert results_app.AsyncResult(second).get(timeout=20) == 2
    assert backend.result_consumer.following_prefix
    backend.store_result(first, 1, states.SUCCESS)
    waiter.join(timeout=20)
    assert got == {first: 1}
    wait_until(lambda: backend.result_consumer.shared._busy_at + 0.2 < time.monotonic(), timeout=5)
    backend.store_result(new_id("elsewhere"), 3, states.SUCCESS)  # another process's result
    wait_until(lambda: not backend.result_consumer.following_prefix, timeout=10,
               message="the prefix subscription ended")
    before = hub.events_delivered(HUB_LABEL)
    for number in range(5):
        backend.store_result(new_id("elsewhere"), number, states.SUCCESS)
    lone = new_id("lone")
    backend.store_result(lone, "lone", states.SUCCESS)
    assert results_app.AsyncResult(lone).get(timeout=20) == "lone"
    assert hub.events_delivered(HUB_LABEL) - before <= 1  # none of the 5 other writes
