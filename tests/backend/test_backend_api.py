"""The etcd result backend on its own (no worker): storing, get(), progress, forget, expiry, options."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import types
import uuid

import pytest
from celery import states
from celery.exceptions import Ignore, ImproperlyConfigured, TimeoutError

from etcd_broker.backend.result_backend import EtcdBackend
from etcd_broker.backend.result_store import ChordCount
from etcd_broker.core.client import get_client
from etcd_broker.core.ops import KeySpace
from tests.backend.conftest import make_app
from tests.helpers import REPO_ROOT, wait_until


def write_later(app, task_id: str, updates: list[tuple[str, object]], delay: float = 0.2) -> threading.Thread:
    """Store ``updates`` for ``task_id`` from another thread (its own backend instance), after ``delay``."""
    def run() -> None:
        time.sleep(delay)
        for state, value in updates:
            app.backend.store_result(task_id, value, state)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_it_stores_celery_meta_as_json_under_the_results_prefix(results_app, etcd_url, etcd_prefix):
    results_app.backend.store_result("t-json", {"answer": 42}, states.SUCCESS)
    value, _ = get_client(etcd_url).get(f"{etcd_prefix}/results/t-json")
    stored = json.loads(value)
    assert stored["status"] == "SUCCESS"
    assert stored["result"] == {"answer": 42}
    assert stored["task_id"] == "t-json"
    assert results_app.AsyncResult("t-json").state == "SUCCESS"


def test_get_returns_a_result_that_was_stored_before_it_was_called(results_app):
    results_app.backend.store_result("t-early", [1, 2, 3], states.SUCCESS)
    assert results_app.AsyncResult("t-early").get(timeout=5) == [1, 2, 3]


def test_get_wakes_up_when_the_result_is_written(results_app):
    results_app.backend.on_task_call(None, "t-late")  # what apply_async does before publishing
    write_later(results_app, "t-late", [(states.SUCCESS, "done")], delay=0.3)
    assert results_app.AsyncResult("t-late").get(timeout=10) == "done"


def test_get_on_message_sees_every_progress_update_in_order(results_app):
    results_app.backend.on_task_call(None, "t-progress")
    updates = [("PROGRESS", {"progress": p}) for p in (10, 40, 70, 90)] + [(states.SUCCESS, "ok")]
    write_later(results_app, "t-progress", updates)
    seen = []
    assert results_app.AsyncResult("t-progress").get(timeout=10, on_message=seen.append) == "ok"
    assert [m["status"] for m in seen] == ["PROGRESS"] * 4 + ["SUCCESS"]
    assert [m["result"]["progress"] for m in seen[:4]] == [10, 40, 70, 90]


def test_a_stored_success_is_never_overwritten(results_app):
    backend = results_app.backend
    backend.store_result("t-dup", "first", states.SUCCESS)
    backend.store_result("t-dup", "late progress", "PROGRESS")
    backend.store_result("t-dup", ValueError("a duplicate run failed"), states.FAILURE)
    assert results_app.AsyncResult("t-dup").get(timeout=5) == "first"


def test_get_with_a_timeout_raises_timeout_error_for_a_task_nobody_runs(results_app):
    with pytest.raises(TimeoutError):
        results_app.AsyncResult("t-never").get(timeout=0.5)


def test_forget_deletes_the_result_at_once(results_app, etcd_url, etcd_prefix):
    results_app.backend.store_result("t-forget", 7, states.SUCCESS)
    results_app.backend.request_cancel("t-forget")
    results_app.AsyncResult("t-forget").forget()
    client = get_client(etcd_url)
    assert client.get(f"{etcd_prefix}/results/t-forget") == (None, None)
    assert client.get(f"{etcd_prefix}/cancel/t-forget") == (None, None)
    assert results_app.AsyncResult("t-forget").state == "PENDING"


def test_results_expire_after_result_expires_through_an_etcd_lease(etcd_url, etcd_prefix):
    app = make_app(etcd_url, etcd_prefix, result_expires=2)
    app.backend.store_result("t-expire", "short-lived", states.SUCCESS)
    client = get_client(etcd_url)
    _, meta = client.get(f"{etcd_prefix}/results/t-expire")
    assert meta.lease_id != 0
    assert client.get_lease_info(meta.lease_id).TTL <= 3
    wait_until(lambda: client.get(f"{etcd_prefix}/results/t-expire") == (None, None), timeout=15,
               message="the expired result is deleted")
    assert app.AsyncResult("t-expire").state == "PENDING"


def test_results_written_together_share_a_lease_so_leases_stay_few(results_app, etcd_url, etcd_prefix):
    for i in range(40):
        results_app.backend.store_result(f"t-bucket-{i}", i, states.SUCCESS)
    leases = {meta.lease_id for _, meta in get_client(etcd_url).get_prefix(f"{etcd_prefix}/results/")}
    assert 0 not in leases
    assert len(leases) <= 2  # one per time bucket; a bucket boundary may fall inside the loop


def test_results_are_kept_without_a_lease_when_result_expires_is_none(etcd_url, etcd_prefix):
    app = make_app(etcd_url, etcd_prefix, result_expires=None)
    app.backend.store_result("t-keep", 1, states.SUCCESS)
    _, meta = get_client(etcd_url).get(f"{etcd_prefix}/results/t-keep")
    assert meta.lease_id == 0


def test_cancel_markers_are_set_and_read_back(results_app):
    backend = results_app.backend
    assert not backend.is_cancelled("t-cancel")
    backend.request_cancel("t-cancel")
    assert backend.is_cancelled("t-cancel")


def test_stop_if_cancelled_records_revoked_and_raises_ignore_only_when_cancelled(results_app):
    backend = results_app.backend
    assert backend.stop_if_cancelled("t-running") is None  # not cancelled: the task goes on
    assert results_app.AsyncResult("t-running").state == states.PENDING
    backend.request_cancel("t-stopped")
    with pytest.raises(Ignore, match="t-stopped was cancelled"):
        backend.stop_if_cancelled("t-stopped")
    assert results_app.AsyncResult("t-stopped").state == states.REVOKED


def test_transport_options_reach_the_etcd_client(etcd_url, etcd_prefix):
    app = make_app(etcd_url, etcd_prefix)
    app.conf.result_backend_transport_options = {"prefix": etcd_prefix, "timeout": 2.5, "user": "web",
                                                 "password": "s3cret"}
    backend = EtcdBackend(app=app, url=etcd_url)
    assert backend.config.timeout == 2.5
    assert backend.config.user == "web"
    assert backend.config.endpoints == get_client(etcd_url).config.endpoints
    assert "s3cret" not in backend.as_uri()


def test_an_unknown_transport_option_is_refused_by_name(etcd_url, etcd_prefix):
    app = make_app(etcd_url, etcd_prefix)
    app.conf.result_backend_transport_options = {"prefix": etcd_prefix, "passwrod": "x"}
    with pytest.raises(ImproperlyConfigured, match="passwrod"):
        EtcdBackend(app=app, url=etcd_url)


def test_a_negative_started_delay_is_refused_naming_the_limit(etcd_url, etcd_prefix):
    app = make_app(etcd_url, etcd_prefix)
    app.conf.result_backend_transport_options = {"prefix": etcd_prefix, "started_delay": -1}
    with pytest.raises(ImproperlyConfigured, match="started_delay must be seconds >= 0"):
        EtcdBackend(app=app, url=etcd_url)


def test_a_bad_url_is_refused_with_the_reason(etcd_prefix):
    app = make_app("etcdv3://127.0.0.1:notaport", etcd_prefix)
    with pytest.raises(ImproperlyConfigured, match="bad port"):
        app.backend  # noqa: B018


def test_plain_settings_select_the_backend_in_django_and_by_entry_point():
    code = (
        "from celery.app.backends import by_name\n"
        "print(by_name('etcdv3').__name__)\n"  # the celery.result_backends entry point, no import
        "from deephardway_site.celery import app\n"
        "print(type(app.backend).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "DJANGO_SETTINGS_MODULE": "deephardway_site.settings"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["EtcdBackend", "EtcdBackend"]


def test_chord_parts_count_once_each_and_exactly_one_completes_the_chord(results_app):
    store = results_app.backend.store
    store.put(store.keys.group_result("g-race"), b"{}", ttl=60)  # apply_chord saves the group first
    store.set_chord_size("g-race", 20, ttl=60)
    store.grow_chord("g-race", ttl=60)  # Task.add_to_chord: one more header task
    outcomes = []

    def report(i: int) -> None:  # every part twice, as a redelivered acks_late task would
        outcomes.append(store.chord_part_done("g-race", f"t{i % 21}.{i % 21}", ttl=60))

    threads = [threading.Thread(target=report, args=(i,)) for i in range(42)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counted = [o for o in outcomes if o is not None]
    assert len(counted) == 21
    assert sorted(o.done for o in counted) == list(range(1, 22))
    assert [o.done == o.size for o in counted].count(True) == 1


def test_a_part_run_again_after_its_chord_was_settled_counts_nothing_and_leaves_no_key(results_app):
    """A part whose worker was cut off runs again elsewhere; if the chord completes in between, the late
    run's count must not recreate the chord's keys (found by the chaos test: parts left under chords/)."""
    store = results_app.backend.store
    store.put(store.keys.group_result("g-late"), b"{}", ttl=60)
    store.set_chord_size("g-late", 1, ttl=60)
    assert store.chord_part_done("g-late", "t0.0", ttl=60) == ChordCount(done=1, size=1)
    store.delete_chord("g-late")
    assert store.chord_part_done("g-late", "t0.0", ttl=60) is None
    assert list(store.client.get_prefix(store.keys.chord("g-late"))) == []
    assert store.client.get(store.keys.group_result("g-late"))[0] is None


def test_endpoint_lists_and_url_passwords_are_shown_without_the_password(etcd_prefix):
    for url in ("etcdv3://web:s3cret@h1:2379,h2:2379", "etcdv3://web:s3cret@h1:2379;etcdv3://web:s3cret@h2:2379"):
        backend = EtcdBackend(app=make_app(url, etcd_prefix), url=url)
        assert backend.config.endpoints == (("h1", 2379), ("h2", 2379))
        assert backend.config.user == "web"
        assert "s3cret" not in backend.as_uri() and "h2:2379" in backend.as_uri()


def test_a_complete_chord_whose_results_come_slowly_publishes_its_callback(etcd_url, etcd_prefix):
    """Every part is counted, but a result is slow to read (a stalled etcd member): the wait for the
    header's results times out once, and the chord still publishes its callback instead of failing it
    (the chaos test failed two chords that way while a member was SIGSTOPped)."""
    app = make_app(etcd_url, etcd_prefix, result_chord_join_timeout=0.5)
    try:
        backend, store = app.backend, app.backend.store
        parts = [f"part-{i}-{uuid.uuid4().hex[:6]}" for i in range(2)]
        header = app.GroupResult(f"g-{uuid.uuid4().hex[:8]}", [app.AsyncResult(part) for part in parts])
        callback = app.signature("tests.celery_app.chord_total", args=("m",), task_id=f"cb-{uuid.uuid4().hex[:8]}")
        backend.apply_chord((header.id, header.results), callback)
        backend.set_chord_size(header.id, 2)
        backend.store_result(parts[0], 1, states.SUCCESS)
        for index, part in enumerate(parts):
            store.chord_part_done(header.id, f"{part}.{index}", ttl=60)
        late = threading.Timer(1.2, backend.store_result, args=(parts[1], 2, states.SUCCESS))
        late.start()
        backend._complete_chord(types.SimpleNamespace(chord=dict(callback)), header.id)
        late.join()
        assert store.read(callback.id)[0] is None, "the callback was failed instead of published"
        ready = list(get_client(etcd_url).get_prefix(KeySpace(etcd_prefix).ready("celery")))
        assert [json.loads(value)["headers"]["id"] for value, _ in ready] == [callback.id]
    finally:
        app.close()
