"""The watch hub's public API: subscribe by key or prefix from a revision, compaction, unsubscribe."""
from __future__ import annotations

import queue
import threading

import pytest
from celery import states

from etcd_broker.backend.result_backend import watch_task
from etcd_broker.core import ops
from etcd_broker.core.watch import HUB_THREAD_NAME, hub_for
from tests.helpers import wait_until


@pytest.fixture
def store(results_app):
    return results_app.backend.store


def put(client, key: str, value: bytes) -> int:
    return ops.txn(client, success=[ops.put(key, value)]).header.revision


def collector() -> tuple[queue.SimpleQueue, callable]:
    got: queue.SimpleQueue = queue.SimpleQueue()
    return got, lambda events: [got.put((e.kv.key.decode(), e.kv.value)) for e in events]


def test_a_prefix_subscription_from_a_past_revision_replays_then_follows(store, etcd_prefix):
    client, prefix = store.client, f"{etcd_prefix}/hub/"
    first = put(client, prefix + "a", b"1")
    put(client, prefix + "b", b"2")
    got, callback = collector()
    store.hub.subscribe(prefix, callback, prefix=True, start_revision=first)
    ops.txn(client, success=[ops.put(prefix + "c", b"3"), ops.put(f"{etcd_prefix}/elsewhere", b"x")])
    assert [got.get(timeout=5) for _ in range(3)] == [(prefix + "a", b"1"), (prefix + "b", b"2"),
                                                      (prefix + "c", b"3")]


def test_after_unsubscribe_nothing_more_is_delivered(store, etcd_prefix):
    key = f"{etcd_prefix}/hub/key"
    got, callback = collector()
    watch = store.hub.subscribe(key, callback, start_revision=put(store.client, key, b"1"))
    assert got.get(timeout=5) == (key, b"1")
    store.hub.unsubscribe(watch)
    later, later_callback = collector()
    store.hub.subscribe(key, later_callback, start_revision=put(store.client, key, b"2"))
    assert later.get(timeout=5) == (key, b"2")  # the write was delivered to the live subscription ...
    assert got.empty()  # ... and not to the cancelled one


def test_a_subscription_older_than_compaction_resyncs_then_follows(store, etcd_prefix):
    key = f"{etcd_prefix}/hub/compacted"
    old = put(store.client, key, b"old")
    put(store.client, key, b"current")
    store.client.compact(store.current_revision())
    resynced: list[bytes] = []

    def on_resync() -> int:
        response = ops.get(store.client, key)
        resynced.append(response.kvs[0].value)
        return response.header.revision

    got, callback = collector()
    store.hub.subscribe(key, callback, start_revision=old, on_resync=on_resync)
    wait_until(lambda: resynced, timeout=10, message="on_resync was called")
    assert resynced == [b"current"]
    put(store.client, key, b"new")
    assert got.get(timeout=5) == (key, b"new")
    assert got.empty()  # the compacted writes were not delivered: on_resync read them instead


def test_a_negative_start_revision_is_refused(store):
    with pytest.raises(ValueError, match="start_revision"):
        store.hub.subscribe("x", lambda events: None, start_revision=-1)


def test_results_task_events_and_subscriptions_share_one_stream(results_app, store, etcd_prefix):
    results_app.backend.store_result("one-stream", 1, states.SUCCESS)
    assert results_app.AsyncResult("one-stream").get(timeout=10) == 1
    events = watch_task("one-stream", app=results_app, timeout=5)
    assert next(events).state == states.SUCCESS
    store.hub.subscribe(f"{etcd_prefix}/other", lambda events: None, prefix=True)
    assert hub_for(results_app.backend.config) is store.hub
    assert [t.name for t in threading.enumerate()].count(HUB_THREAD_NAME) == 1
