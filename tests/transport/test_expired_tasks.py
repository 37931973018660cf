"""A task sent with ``expires`` already past: the broker drops it and its result is REVOKED (issue 18 item 4).

Celery's worker marks a late task REVOKED when it receives one; our broker drops it before
any worker sees it, so the transport stores that state through the app's etcd result backend.
"""
from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from celery import Celery, states
from celery._state import get_current_app
from celery.exceptions import TaskRevokedError

import etcd_broker  # noqa: F401 - registers etcdv3://
from etcd_broker.backend.result_store import close_shared
from etcd_broker.core.client import get_client
from etcd_broker.core.ops import KeySpace, range_end


@pytest.fixture
def current_results_app(etcd_url, etcd_prefix):
    """The current Celery app (as a site's or a worker's is), with the etcd broker and result backend."""
    previous = get_current_app()
    app = Celery(f"expired-{etcd_prefix}", broker=etcd_url, backend=etcd_url)  # set as current
    app.conf.update(broker_transport_options={"prefix": etcd_prefix},
                    result_backend_transport_options={"prefix": etcd_prefix},
                    task_serializer="json", result_serializer="json", accept_content=["json"])
    yield app
    app.close()
    close_shared()
    previous.set_current()


def _ready_count(etcd_url: str, etcd_prefix: str, queue: str) -> int:
    prefix = KeySpace(etcd_prefix).ready(queue)
    return get_client(etcd_url).get_range_response(prefix, range_end(prefix), count_only=True).count


def test_a_task_sent_already_expired_is_dropped_and_its_result_is_revoked(current_results_app, etcd_url,
                                                                          etcd_prefix):
    result = current_results_app.send_task("no.such.task", args=(1,),
                                           expires=datetime.now(UTC) - timedelta(seconds=10))
    kept = current_results_app.send_task("no.such.task", args=(2,), expires=600)

    assert result.state == states.REVOKED
    with pytest.raises(TaskRevokedError, match="expired"):
        result.get(timeout=10)
    assert kept.state == states.PENDING
    assert _ready_count(etcd_url, etcd_prefix, "celery") == 1  # only the task in time waits
