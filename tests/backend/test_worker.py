"""The etcd result backend behind a real ``celery worker`` (broker and backend both on etcd)."""
from __future__ import annotations

import threading
import uuid

import pytest
from celery import chord, group
from celery.exceptions import ChordError, TaskRevokedError

from etcd_broker.backend.result_backend import watch_task
from etcd_broker.core import ops
from etcd_broker.core.client import get_client
from etcd_broker.core.ops import KeySpace
from tests.backend.conftest import task
from tests.helpers import wait_until


def test_a_task_result_comes_back_from_the_worker(worker_app):
    assert task(worker_app, "add", 2, 3).apply_async().get(timeout=30) == 5
    assert task(worker_app, "noop").apply_async().get(timeout=30) is None


def test_get_on_message_sees_each_progress_update_in_order(worker_app):
    seen = []
    result = task(worker_app, "count_with_progress", 5, 0.05).apply_async()
    assert result.get(timeout=30, on_message=seen.append) == 5
    progress = [m["result"]["progress"] for m in seen if m["status"] == "PROGRESS"]
    assert progress == [20, 40, 60, 80, 100]
    assert seen[-1]["status"] == "SUCCESS"


def test_a_get_started_after_some_progress_still_sees_every_state_in_order(worker_app):
    """Its watch begins after PROGRESS 20 and 40 were written: they come from etcd's history."""
    seen = []
    result = task(worker_app, "count_with_progress", 5, 0.3).apply_async()
    events = watch_task(result.id, app=worker_app, timeout=30)
    next(e for e in events if e.state == "PROGRESS" and e.progress >= 40)  # 20 and 40 are stored
    assert result.get(timeout=30, on_message=seen.append) == 5
    assert [m["result"]["progress"] for m in seen if m["status"] == "PROGRESS"] == [20, 40, 60, 80, 100]
    assert seen[-1]["status"] == "SUCCESS"


def test_a_get_without_on_message_reads_no_history(worker_app):
    """Only a caller asking for every state pays for the history reads."""
    result = task(worker_app, "count_with_progress", 3, 0.05).apply_async()
    wait_until(lambda: result.state == "SUCCESS", timeout=30, message="the task done")
    store = worker_app.backend.store
    reads = []
    original = store.earlier_states
    store.earlier_states = lambda *args: reads.append(args) or original(*args)
    try:
        assert result.get(timeout=30) == 3
    finally:
        del store.earlier_states
    assert reads == []


def test_every_watcher_sees_every_progress_update_in_order(worker_app):
    result = task(worker_app, "count_with_progress", 4, 0.1).apply_async()
    streams = [watch_task(result.id, app=worker_app, timeout=30) for _ in range(3)]
    seen: list[list[int | None]] = [[] for _ in streams]

    def follow(index: int) -> None:
        seen[index] = [e.progress for e in streams[index] if e.state in ("PROGRESS", "SUCCESS")]

    threads = [threading.Thread(target=follow, args=(i,)) for i in range(len(streams))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert result.get(timeout=30) == 4
    for progress in seen:
        # A watcher that started late begins at the state current then; none skips a later one.
        assert progress[-1] == 100
        assert progress == sorted(progress)
        assert progress[-5:] == [25, 50, 75, 100, 100][-len(progress):]


def test_a_group_is_joined_natively(worker_app):
    result = group(task(worker_app, "add", i, i) for i in range(10)).apply_async()
    assert result.supports_native_join
    assert result.get(timeout=30) == [2 * i for i in range(10)]


def test_a_chord_callback_runs_exactly_once(worker_app, etcd_url, module_prefix):
    marker = uuid.uuid4().hex
    header = [task(worker_app, "add", i, 1) for i in range(12)]
    result = chord(header)(task(worker_app, "chord_total", marker))
    assert result.get(timeout=60) == sum(i + 1 for i in range(12))
    client = get_client(etcd_url)
    value, meta = client.get(f"{module_prefix}/markers/{marker}")
    assert value == b"78"
    assert meta.version == 1  # one put: the callback ran once
    group_id = result.parent.id
    wait_until(lambda: not list(client.get_prefix(f"{module_prefix}/chords/{group_id}/")), timeout=10,
               message="chord counting keys removed")


def test_a_chord_with_a_failing_part_fails_its_callback(worker_app):
    header = [task(worker_app, "add", 1, 1), task(worker_app, "fail", "part broke")]
    result = chord(header)(task(worker_app, "chord_total", uuid.uuid4().hex))
    with pytest.raises(ChordError, match="part broke"):
        result.get(timeout=60, follow_parents=False)  # the callback's own state
    with pytest.raises(ValueError, match="part broke"):
        result.get(timeout=60)  # Celery re-raises the header's error first


def test_a_failure_comes_back_with_its_exception_type_and_message(worker_app):
    with pytest.raises(KeyError) as caught:
        task(worker_app, "fail_with", "KeyError", "no model named x").apply_async().get(timeout=30)
    assert caught.value.args == ("no model named x",)
    result = task(worker_app, "fail", "bad input: width 0 < 1").apply_async()
    with pytest.raises(ValueError, match="bad input: width 0 < 1"):
        result.get(timeout=30)
    (event,) = list(watch_task(result.id, app=worker_app, timeout=10))
    assert event.result == {"exc_type": "ValueError", "exc_message": "bad input: width 0 < 1"}
    assert result.traceback and "ValueError" in result.traceback


def test_revoking_a_queued_task_marks_it_revoked_for_watchers(worker_app):
    result = task(worker_app, "add", 1, 2).apply_async(countdown=60)  # held by the worker until its ETA
    events = watch_task(result.id, app=worker_app, timeout=30)
    assert next(events).state == "PENDING"
    result.revoke()
    assert [e.state for e in events][-1] == "REVOKED"
    with pytest.raises(TaskRevokedError):
        result.get(timeout=10)


def test_revoke_with_terminate_stops_a_running_task_at_its_next_progress_point(worker_app):
    result = task(worker_app, "count_with_progress", 400, 0.05).apply_async()  # 20 s if left alone
    events = watch_task(result.id, app=worker_app, timeout=30)
    assert next(e for e in events if e.state == "PROGRESS").progress < 100
    result.revoke(terminate=True)
    final = [e for e in events][-1]
    assert final.state == "REVOKED"
    assert final.progress is None
    with pytest.raises(TaskRevokedError):
        result.get(timeout=10)


def test_request_cancel_stops_a_running_task_without_a_broadcast(worker_app):
    result = task(worker_app, "count_with_progress", 400, 0.05).apply_async()
    events = watch_task(result.id, app=worker_app, timeout=30)
    next(e for e in events if e.state == "PROGRESS")
    worker_app.backend.request_cancel(result.id)
    assert [e.state for e in events][-1] == "REVOKED"
    assert worker_app.backend.is_cancelled(result.id)


def test_forget_removes_a_workers_result(worker_app, etcd_url, module_prefix):
    result = task(worker_app, "add", 20, 22).apply_async()
    assert result.get(timeout=30) == 42
    result.forget()
    assert get_client(etcd_url).get(f"{module_prefix}/results/{result.id}") == (None, None)
    assert worker_app.AsyncResult(result.id).state == "PENDING"


def _values_under(client, prefix: str, revision: int) -> list[bytes]:
    response = client.call("Range", ops.range_request(prefix, prefix=True, revision=revision))
    return [kv.value for kv in response.kvs]


def test_an_acks_late_success_deletes_its_message_in_the_same_revision(worker_app, etcd_url, module_prefix):
    """-P threads: the SUCCESS write acks (consumer.py): no moment has both a result and a pending message."""
    result = task(worker_app, "sleep_then_record", 0, "settled").apply_async()
    assert result.get(timeout=30) == "settled"
    client = get_client(etcd_url)
    _, meta = client.get(KeySpace(module_prefix).result(result.id))
    unacked = KeySpace(module_prefix).unacked("celery")
    assert any(result.id.encode() in v for v in _values_under(client, unacked, meta.mod_revision - 1))
    assert not any(result.id.encode() in v for v in _values_under(client, unacked, meta.mod_revision))
