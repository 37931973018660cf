"""watch_task(): the streaming API the web tier uses; revisions as event ids, no misses, no repeats."""
from __future__ import annotations

import threading

import pytest
from celery import Celery, states

from etcd_broker.backend.result_backend import TaskEvent, watch_task
from etcd_broker.core.watch import HUB_THREAD_NAME, hub_for


def store(app, task_id: str, updates: list[tuple[str, object]]) -> None:
    for state, value in updates:
        app.backend.store_result(task_id, value, state)


PROGRESS = [("PROGRESS", {"progress": p, "stage": f"step {p}"}) for p in (20, 50, 80)]


def test_it_yields_pending_then_each_change_and_ends_at_success(results_app):
    events = watch_task("w-life", app=results_app, timeout=10)
    first = next(events)
    assert (first.state, first.revision, first.result) == ("PENDING", 0, None)
    store(results_app, "w-life", PROGRESS + [(states.SUCCESS, {"label": "cat"})])
    rest = list(events)
    assert [e.state for e in rest] == ["PROGRESS"] * 3 + ["SUCCESS"]
    assert [e.progress for e in rest] == [20, 50, 80, 100]
    assert rest[0].result == {"progress": 20, "stage": "step 20"}
    assert rest[-1].result == {"label": "cat"} and rest[-1].date_done
    revisions = [e.revision for e in rest]
    assert revisions == sorted(set(revisions))
    assert rest[-1].to_dict() == {"task_id": "w-life", "state": "SUCCESS", "result": {"label": "cat"},
                                  "progress": 100, "revision": rest[-1].revision,
                                  "date_done": rest[-1].date_done}


def test_it_starts_with_the_current_state_and_ends_at_once_if_it_is_final(results_app):
    store(results_app, "w-done", PROGRESS + [(states.SUCCESS, 3)])
    events = list(watch_task("w-done", app=results_app, timeout=5))
    assert [(e.state, e.result) for e in events] == [("SUCCESS", 3)]


def test_resuming_after_a_revision_replays_exactly_what_was_missed(results_app):
    store(results_app, "w-resume", PROGRESS)
    seen = watch_task("w-resume", app=results_app, timeout=5)
    current = next(seen)
    assert current.progress == 80
    seen.close()
    # The client saw progress 20, then lost its connection; 50 and 80 were stored meanwhile.
    first_revision = current.revision - 1  # the put of progress 50 ...
    store(results_app, "w-resume", [(states.SUCCESS, "fine")])
    all_events = list(watch_task("w-resume", app=results_app, after_revision=first_revision - 1, timeout=5))
    assert [e.progress for e in all_events] == [50, 80, 100]
    after_last = list(watch_task("w-resume", app=results_app, after_revision=all_events[-1].revision, timeout=5))
    assert after_last == []  # nothing new, and the task is finished: no repeat


def test_failure_and_revoke_carry_exception_type_and_message(results_app):
    store(results_app, "w-fail", [(states.FAILURE, KeyError("no such model"))])
    (event,) = watch_task("w-fail", app=results_app, timeout=5)
    assert event.state == "FAILURE" and event.final
    assert event.result == {"exc_type": "KeyError", "exc_message": "no such model"}
    results_app.backend.mark_as_revoked("w-revoked", reason="user cancelled")
    (event,) = watch_task("w-revoked", app=results_app, timeout=5)
    assert event.state == "REVOKED"
    assert event.result == {"exc_type": "TaskRevokedError", "exc_message": "user cancelled"}


def test_forget_while_watching_reads_as_pending_again(results_app):
    store(results_app, "w-forget", PROGRESS[:1])
    events = watch_task("w-forget", app=results_app, timeout=5)
    assert next(events).state == "PROGRESS"
    results_app.AsyncResult("w-forget").forget()
    event = next(events)
    assert event.state == "PENDING" and event.revision > 0
    events.close()


def test_timeout_bounds_the_wait_for_the_next_event(results_app):
    events = watch_task("w-quiet", app=results_app, timeout=0.3)
    assert next(events).state == "PENDING"
    with pytest.raises(TimeoutError, match="w-quiet"):
        next(events)


def test_many_concurrent_streams_share_one_watch_stream_and_all_see_every_update(results_app):
    count = 20
    collected: list[list[TaskEvent]] = [[] for _ in range(count)]
    started = threading.Barrier(count + 1)

    def follow(index: int) -> None:
        events = watch_task("w-many", app=results_app, timeout=10)
        collected[index].append(next(events))
        started.wait()
        collected[index].extend(events)

    threads = [threading.Thread(target=follow, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    started.wait(timeout=10)
    store(results_app, "w-many", PROGRESS + [(states.SUCCESS, "all")])
    for thread in threads:
        thread.join(timeout=15)
    assert all([e.state for e in events] == ["PENDING", "PROGRESS", "PROGRESS", "PROGRESS", "SUCCESS"]
               for events in collected)
    names = [t.name for t in threading.enumerate() if t.name == HUB_THREAD_NAME]
    assert len(names) == 1
    assert hub_for(results_app.backend.config) is results_app.backend.store.hub


def test_a_non_etcd_app_is_refused_with_a_clear_error():
    other = Celery("plain", backend="cache+memory://", set_as_current=False)
    with pytest.raises(TypeError, match="etcd result backend.*CacheBackend"):
        watch_task("x", app=other)


def test_a_negative_after_revision_is_refused(results_app):
    with pytest.raises(ValueError, match="after_revision"):
        watch_task("x", app=results_app, after_revision=-1)
