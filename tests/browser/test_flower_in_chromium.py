"""Flower's Broker page and /api/queues/length show our etcd queues (etcd_broker.flower, loaded by
the site's deephardway_site/flowerconfig.py): a real Flower process, a real worker on a real etcd, Chromium."""
from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import pytest
from celery import Celery

from etcd_broker.core.client import get_client
from etcd_broker.core.ops import KeySpace
from etcd_broker.stats import queue_stats
from scripts.etcd_server import free_port
from scripts.processes import log_tail, stop_process
from tests.helpers import REPO_ROOT, wait_until

pytestmark = pytest.mark.browser

#: Tasks sent; a worker with one slot runs one (unacknowledged: acks_late) and the rest wait.
SENT = 4
#: Seconds each task sleeps: longer than the test, so the counts hold while the page is read.
TASK_SECONDS = 600
#: Flower starts, connects to etcd and answers its health check within this (loaded machine).
FLOWER_START_SECONDS = 90


@pytest.fixture
def flower(etcd_url, etcd_prefix, tmp_path):
    """``celery -A tests.celery_app flower --conf=deephardway_site/flowerconfig.py`` on a free loopback port."""
    port = free_port()
    env = {**os.environ, "ETCD_TEST_URL": etcd_url, "ETCD_TEST_PREFIX": etcd_prefix, "PYTHONUNBUFFERED": "1",
           "FLOWER_UNAUTHENTICATED_API": "true"}  # Flower 2.x serves its API to no one else
    env.pop("DJANGO_SETTINGS_MODULE", None)
    log_path = tmp_path / "flower.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.celery_app", "flower", f"--conf={REPO_ROOT / 'deephardway_site' / 'flowerconfig.py'}",
             "--address=127.0.0.1", f"--port={port}"],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert process.poll() is None, f"flower exited with {process.returncode}:\n{log_tail(log_path, 40)}"
        try:
            return urllib.request.urlopen(f"{url}/healthcheck", timeout=5).status == 200
        except OSError:
            return False

    wait_until(healthy, timeout=FLOWER_START_SECONDS, interval=0.2, message="flower answers /healthcheck")
    yield url
    stop_process(process)


def test_flower_shows_our_queue_waiting_unacked_and_consumers(chromium, flower, worker_factory, etcd_url, etcd_prefix):
    worker_factory(env={"ETCD_TEST_URL": etcd_url, "ETCD_TEST_PREFIX": etcd_prefix}, queues="celery", concurrency=1)
    app = Celery("flower-client", broker=etcd_url, backend=etcd_url, set_as_current=False)
    app.conf.update(broker_transport_options={"prefix": etcd_prefix}, task_serializer="json",
                    result_backend_transport_options={"prefix": etcd_prefix}, accept_content=["json"])
    for n in range(SENT):
        app.send_task("tests.celery_app.sleep_then_record", args=(TASK_SECONDS, f"m{n}"), queue="celery")
    client, keys = get_client(etcd_url), KeySpace(etcd_prefix)
    wanted = {"ready": SENT - 1, "unacked": 1, "consumers": 1}

    def settled() -> bool:
        rows = {row["queue"]: row for row in queue_stats(client, keys)}
        return {name: rows.get("celery", {}).get(name) for name in wanted} == wanted

    wait_until(settled, timeout=60, interval=0.1, message=f"etcd shows {wanted} for 'celery'")

    context = chromium.new_context(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page = context.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        response = page.goto(f"{flower}/broker")
        assert response.status == 200, response.text()[:500]
        row = page.locator("#queue-table tbody tr#celery")
        cells = row.locator("td").all_inner_texts()
        # Queue, Messages, Unacked, Ready, Consumers (Flower's columns, as for RabbitMQ)
        assert [cell.strip() for cell in cells[:5]] == ["celery", str(SENT), "1", str(SENT - 1), "1"]
        api = page.request.get(f"{flower}/api/queues/length")
        assert api.status == 200, api.text()[:500]
        assert {"name": "celery", "messages": SENT, "messages_ready": SENT - 1, "messages_unacknowledged": 1,
                "consumers": 1} in api.json()["active_queues"]
    finally:
        context.close()
        app.close()
    assert errors == [], f"JavaScript errors on Flower's page: {errors}"
