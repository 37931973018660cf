"""Celery's own ``expires=`` on a task, now that the transport honours message TTLs.

Celery sends ``expires`` both as a task header (the worker revokes a late task) and as
the message's ``expiration`` (the broker may drop it unread, as RabbitMQ does).
"""
from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

from tests.helpers import wait_until
from tests.transport import marker_app
from tests.transport.test_celery_worker import APP, env_for, markers  # noqa: F401 - markers is a fixture


def test_a_task_with_expires_runs_before_it_expires_and_never_after(markers, worker_factory, etcd_url,  # noqa: F811
                                                                    etcd_prefix):
    marker_app.record.apply_async(("late", 1), expires=1)  # no worker yet: it expires waiting
    marker_app.record.apply_async(("late", 2), expires=datetime.now(UTC) - timedelta(seconds=10))  # already past: Celery sends TTL 0
    time.sleep(2.5)
    worker_factory(app=APP, env=env_for(etcd_url, etcd_prefix), concurrency=2)
    marker_app.record.apply_async(("in-time", 3), expires=60)
    marker_app.record.delay("plain", 4)
    wait_until(lambda: markers("in-time") and markers("plain"), timeout=30, message="tasks in time ran")
    time.sleep(1)
    assert [row["value"] for row in markers("in-time")] == [3]
    assert markers("late") == []
