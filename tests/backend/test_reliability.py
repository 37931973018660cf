"""The result backend while etcd goes away: nothing lost, nothing repeated, timeouts honoured."""
from __future__ import annotations

import threading
import time
import uuid

import pytest
from celery import states
from celery.exceptions import TimeoutError

from etcd_broker.backend.result_backend import watch_task
from scripts.etcd_server import start_cluster
from tests.backend.conftest import make_app, task, worker_env

pytestmark = pytest.mark.reliability


def restart_after(server, down_at: float, down_for: float) -> threading.Thread:
    """Stop ``server`` after ``down_at`` seconds and start it again (same data dir) ``down_for`` later."""
    def run() -> None:
        time.sleep(down_at)
        server.stop()
        time.sleep(down_for)
        server.start()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_get_waiting_through_an_etcd_restart_returns_the_result(private_etcd, worker_factory):
    prefix = f"/tr-{uuid.uuid4().hex[:8]}"
    worker_factory(env=worker_env(private_etcd.url, prefix), concurrency=2)
    app = make_app(private_etcd.url, prefix)
    result = task(app, "sleep_then_record", 2.5, "survived").apply_async()
    restarter = restart_after(private_etcd, down_at=0.5, down_for=1.5)
    assert result.get(timeout=60) == "survived"
    restarter.join()
    app.close()


def test_a_get_with_a_timeout_raises_while_etcd_stays_down(private_etcd):
    app = make_app(private_etcd.url, f"/tr-{uuid.uuid4().hex[:8]}")
    result = app.AsyncResult("never-finishes")
    app.backend.on_task_call(None, result.id)
    private_etcd.stop()
    with pytest.raises(TimeoutError):
        result.get(timeout=2)
    private_etcd.start()
    app.backend.store_result(result.id, "late", states.SUCCESS)
    assert result.get(timeout=10) == "late"  # the same waiter recovers once etcd is back
    app.close()


def test_watch_task_neither_misses_nor_repeats_across_a_reconnect(private_etcd):
    app = make_app(private_etcd.url, f"/tr-{uuid.uuid4().hex[:8]}")
    writer = make_app(private_etcd.url, app.conf.result_backend_transport_options["prefix"])
    events = watch_task("t-reconnect", app=app, timeout=30)
    assert next(events).state == "PENDING"
    for p in (10, 20, 30):
        writer.backend.store_result("t-reconnect", {"progress": p}, "PROGRESS")
    private_etcd.stop()
    private_etcd.start()
    for p in (40, 50):
        writer.backend.store_result("t-reconnect", {"progress": p}, "PROGRESS")
    writer.backend.store_result("t-reconnect", "done", states.SUCCESS)
    rest = list(events)
    assert [e.progress for e in rest] == [10, 20, 30, 40, 50, 100]
    assert [e.revision for e in rest] == sorted({e.revision for e in rest})
    app.close()
    writer.close()


def test_results_keep_flowing_when_the_cluster_member_in_use_dies(tmp_path):
    members = start_cluster(3)
    try:
        url = "etcdv3://" + ",".join(f"{m.host}:{m.port}" for m in members)
        app = make_app(url, f"/tr-{uuid.uuid4().hex[:8]}")
        assert "," in app.backend.as_uri()
        app.backend.store_result("t-before", 1, states.SUCCESS)
        events = watch_task("t-failover", app=app, timeout=30)
        assert next(events).state == "PENDING"
        members[0].stop(kill=True)
        app.backend.store_result("t-failover", {"progress": 50}, "PROGRESS")
        app.backend.store_result("t-failover", "after", states.SUCCESS)
        assert [e.state for e in events] == ["PROGRESS", "SUCCESS"]
        assert app.AsyncResult("t-before").get(timeout=10) == 1
        app.close()
    finally:
        for member in members:
            member.cleanup()


def test_a_state_read_waits_out_an_etcd_restart(private_etcd):
    """A task's state read (in a worker: Celery's look-up of a redelivered task) waits for etcd like a
    write, instead of raising into the task (the 10-minute prefork chaos run, seed 2875818680: a chord part
    failed with EtcdUnreachable from that look-up during a leader kill)."""
    app = make_app(private_etcd.url, f"/tr-{uuid.uuid4().hex[:8]}")
    app.backend.store_result("stored-before", "kept", states.SUCCESS)
    private_etcd.stop()  # the read below starts during the outage
    starter = threading.Timer(1.5, private_etcd.start)
    starter.start()
    assert app.AsyncResult("stored-before").state == states.SUCCESS
    starter.join()
    app.close()
