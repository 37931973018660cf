"""The transport under a real ``celery worker``: delivery, priorities, control, kills, etcd restarts."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from etcd_broker.core.client import get_client
from tests.helpers import REPO_ROOT, wait_until
from tests.transport import marker_app

APP = "tests.transport.marker_app"


def point_app_at(url: str, prefix: str, monkeypatch) -> None:
    """Point the marker app in this process at ``url``/``prefix`` with fresh connection pools."""
    app = marker_app.app
    monkeypatch.setattr(marker_app, "PREFIX", prefix)
    if app._pool is not None:
        app._pool.force_close_all()
    app._pool = None
    app.amqp._producer_pool = None
    app.conf.broker_url = url
    app.conf.broker_transport_options = {"prefix": prefix, "lease_ttl": 3}


@pytest.fixture
def markers(etcd_url, etcd_prefix, monkeypatch):
    """Point the marker app (in this process and in workers) at this test's etcd and prefix."""
    point_app_at(etcd_url, etcd_prefix, monkeypatch)
    client = get_client(etcd_url)

    def read(name: str) -> list[dict]:
        rows = [(meta.create_revision, json.loads(value))
                for value, meta in client.get_prefix(f"{etcd_prefix}/markers/{name}/")]
        return [info for _, info in sorted(rows, key=lambda row: row[0])]

    yield read


def env_for(etcd_url: str, etcd_prefix: str, lease_ttl: int = 3) -> dict[str, str]:
    return {"ETCD_TEST_URL": etcd_url, "ETCD_TEST_PREFIX": etcd_prefix, "ETCD_TEST_LEASE_TTL": str(lease_ttl)}


def test_a_worker_runs_every_task_once(markers, worker_factory, etcd_url, etcd_prefix):
    worker_factory(app=APP, env=env_for(etcd_url, etcd_prefix), concurrency=4)
    for i in range(40):
        marker_app.record.delay("ran", i)
    wait_until(lambda: len(markers("ran")) >= 40 and markers("ran"), timeout=30, message="40 tasks ran")
    time.sleep(0.5)
    assert sorted(row["value"] for row in markers("ran")) == list(range(40))


def test_a_worker_takes_the_most_urgent_tasks_first(markers, worker_factory, etcd_url, etcd_prefix):
    for i, priority in enumerate([0, 3, 9, 3, 9, 0]):
        marker_app.record.apply_async(("order", i), priority=priority)
    worker_factory(app=APP, env=env_for(etcd_url, etcd_prefix), concurrency=1)
    rows = wait_until(lambda: len(markers("order")) == 6 and markers("order"), timeout=30, message="6 ran")
    assert [row["value"] for row in rows] == [2, 4, 1, 3, 0, 5]


def test_inspect_ping_and_broadcast_reach_a_worker_in_another_process(markers, worker_factory, etcd_url, etcd_prefix):
    worker = worker_factory(app=APP, env=env_for(etcd_url, etcd_prefix))
    replies = marker_app.app.control.inspect(timeout=5).ping()
    assert replies and any(name.startswith(worker.hostname.split("@")[0]) for name in replies)
    assert all(reply == {"ok": "pong"} for reply in replies.values())
    # The command line, as an operator would type it, in yet another process.
    cli = subprocess.run([sys.executable, "-m", "celery", "-A", APP, "inspect", "ping", "-t", "5"],
                         cwd=REPO_ROOT, env={**__import__("os").environ, **env_for(etcd_url, etcd_prefix)},
                         capture_output=True, text=True, timeout=60)
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "pong" in cli.stdout


@pytest.mark.reliability
def test_an_acks_late_task_survives_a_worker_killed_mid_task(markers, worker_factory, etcd_url, etcd_prefix):
    first = worker_factory(app=APP, env=env_for(etcd_url, etcd_prefix, lease_ttl=3), concurrency=1)
    marker_app.slow.delay("job", 2.0)
    wait_until(lambda: markers("job-started"), timeout=20, message="task started")
    first.kill()
    killed_at = time.time()
    worker_factory(app=APP, env=env_for(etcd_url, etcd_prefix, lease_ttl=3), concurrency=1)
    done = wait_until(lambda: markers("job-done"), timeout=30, message="task finished elsewhere")
    started = markers("job-started")
    assert len(started) == 2 and len(done) == 1
    assert started[1]["pid"] != started[0]["pid"]
    redelivered_after = started[1]["at"] - killed_at
    assert redelivered_after < 15, f"redelivered {redelivered_after:.1f}s after the kill; the lease TTL is 3s"


@pytest.mark.reliability
def test_a_long_task_on_a_live_worker_is_never_redelivered(markers, worker_factory, etcd_url, etcd_prefix):
    env = env_for(etcd_url, etcd_prefix, lease_ttl=2)
    worker_factory(app=APP, env=env, concurrency=1)
    marker_app.slow.delay("long", 8.0)  # four lease TTLs
    wait_until(lambda: markers("long-started"), timeout=20, message="task started")
    worker_factory(app=APP, env=env, concurrency=1)  # an idle competitor
    wait_until(lambda: markers("long-done"), timeout=30, message="task finished")
    assert len(markers("long-started")) == 1


@pytest.mark.reliability
def test_a_worker_keeps_consuming_across_an_etcd_restart(private_etcd, worker_factory, etcd_prefix, monkeypatch):
    url = private_etcd.url
    point_app_at(url, etcd_prefix, monkeypatch)
    worker = worker_factory(app=APP, env=env_for(url, etcd_prefix, lease_ttl=5), concurrency=2)
    client = get_client(url)

    def count(name):
        return len(list(client.get_prefix(f"{etcd_prefix}/markers/{name}/", keys_only=True)))

    for i in range(5):
        marker_app.record.delay("restart", i)
    wait_until(lambda: count("restart") == 5, timeout=30, message="first 5 ran")
    private_etcd.stop()
    time.sleep(2)
    private_etcd.start()
    with marker_app.app.connection_for_write() as conn:
        for i in range(5, 10):
            marker_app.record.apply_async(("restart", i), connection=conn,
                                          retry=True, retry_policy={"max_retries": 20, "interval_start": 0.5})
    wait_until(lambda: count("restart") == 10, timeout=60, message="5 more ran after the restart")
    assert worker.process.poll() is None, "the worker died instead of reconnecting"


def test_celery_events_from_a_worker_reach_an_event_receiver(markers, worker_factory, etcd_url, etcd_prefix):
    import threading

    worker_factory(app=APP, env=env_for(etcd_url, etcd_prefix), extra_args=["-E"])
    app = marker_app.app
    seen: list[str] = []
    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": lambda event: seen.append(event["type"])})
        capture = threading.Thread(target=receiver.capture, kwargs={"limit": None, "timeout": 30}, daemon=True)
        capture.start()
        wait_until(lambda: "worker-heartbeat" in seen, timeout=20, message="a heartbeat (receiver bound)")
        marker_app.record.delay("evented", 1)
        wait_until(lambda: "task-succeeded" in seen, timeout=20, message="task events")
        receiver.should_stop = True
        capture.join(10)
    assert {"task-received", "task-started", "task-succeeded"} <= set(seen)


def test_a_producer_gets_a_clear_error_when_etcd_is_down(private_etcd, etcd_prefix, monkeypatch):
    from kombu.exceptions import OperationalError

    point_app_at(private_etcd.url, etcd_prefix, monkeypatch)
    marker_app.record.delay("before", 0)  # connected and working
    private_etcd.stop()
    started = time.monotonic()
    with pytest.raises(OperationalError) as info:
        marker_app.record.apply_async(("down", 1), retry=True,
                                      retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.2})
    assert time.monotonic() - started < 30
    assert "etcd" in str(info.value).lower()
