"""GET /metrics (jobs/metrics.py), the admin's queue panel and the worker's exporter
(jobs/worker_metrics.py), scraped during real runs: real etcd, real workers, PostgreSQL."""
from __future__ import annotations

import json
import time
import urllib.request

import pytest
from django.db import transaction
from prometheus_client.parser import text_string_to_metric_families

from etcd_broker.core.client import get_client
from etcd_broker.core.ops import KeySpace
from etcd_broker.stats import live_consumers
from jobs.management.commands.watch_jobs import JobWatcher
from jobs.models import Job, Status
from scripts.etcd_server import free_port
from tests.helpers import wait_until
from tests.site.fixtures import png_data_url

pytestmark = pytest.mark.django_db

#: Priorities of the jobs submitted before a worker runs: what the queue must show per priority.
PRIORITIES = (9, 9, 5, 2)
#: Digits requests sent at once to the worker (each one row in some micro-batch).
DIGIT_JOBS = 6

Samples = dict[tuple[str, frozenset], float]


def parse(text: str) -> Samples:
    """{(sample name, labels): value} of a Prometheus text page."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when absent (a counter or histogram child not created yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def scrape(client) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain")
    return parse(response.content.decode())


def scrape_url(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as response:
        return parse(response.read().decode())


def submit(client, model: str, data: dict, priority: int = 5) -> str:
    body = {"model": model, "input": data, "priority": priority}
    response = client.post("/api/jobs", json.dumps(body), content_type="application/json")
    assert response.status_code == 202, response.content
    return response.json()["id"]


def gpu_consumers(settings) -> int:
    """Live consumers of the gpu queue, read from their etcd keys one by one (with their leases):
    other site tests' consumers (SimpleQueue readers) may still be alive in this session."""
    found = live_consumers(get_client(settings.ETCD_URL), KeySpace(settings.ETCD_PREFIX))
    return sum("gpu" in (consumer.get("queues") or []) for consumer in found)


@pytest.fixture
def watcher(site_celery):
    running = JobWatcher(site_celery).start()
    yield running
    running.stop()


def test_it_counts_eta_tasks_waiting_in_etcd_and_when_the_next_is_due(client, staff, site_celery):
    client.force_login(staff)
    site_celery.send_task("jobs.tasks.nothing", queue="eta-probe", countdown=600)
    sent_at = time.time()
    try:
        samples = scrape(client)
        assert value(samples, "deephardway_queue_delayed_messages", queue="eta-probe") == 1
        due = value(samples, "deephardway_queue_next_due_timestamp_seconds", queue="eta-probe")
        assert sent_at + 590 < due < sent_at + 610
    finally:
        with site_celery.connection_for_write() as conn:
            conn.default_channel.queue_purge("eta-probe")


@pytest.mark.django_db(transaction=True)  # submissions are counted when their transaction commits
def test_it_shows_queue_depth_by_priority_and_jobs_by_state(client, staff, site_celery, make_job, settings):
    client.force_login(staff)  # staff may use priority 9
    before = scrape(client)
    for index, priority in enumerate(PRIORITIES):
        submit(client, "text", {"prompt": f"queued {index}"}, priority)
    make_job(staff, status=Status.RUNNING, model="digits")
    make_job(staff, status=Status.SUCCEEDED, model="digits")  # finished: counted when it finishes, not here
    samples = scrape(client)

    assert value(samples, "deephardway_broker_up") == 1 and value(samples, "deephardway_database_up") == 1
    assert value(samples, "deephardway_etcd_db_size_bytes") > 0 and value(samples, "deephardway_etcd_alarm",
                                                                           alarm="NOSPACE") == 0
    assert 0 < value(samples, "deephardway_etcd_db_size_in_use_bytes") <= value(samples, "deephardway_etcd_db_size_bytes")
    assert value(samples, "deephardway_etcd_compaction_lag_revisions") > 0
    for priority in range(10):
        expected = PRIORITIES.count(priority)
        assert value(samples, "deephardway_queue_ready_messages", queue="gpu", priority=str(priority)) == expected
    assert value(samples, "deephardway_queue_unacked_messages", queue="gpu") == 0
    assert value(samples, "deephardway_queue_consumers", queue="gpu") == gpu_consumers(settings)
    assert value(samples, "deephardway_jobs", queue="gpu", model="text", state="queued") == len(PRIORITIES)
    assert value(samples, "deephardway_jobs", queue="gpu", model="text", state="running") == 0
    assert value(samples, "deephardway_jobs", queue="gpu", model="digits", state="running") == 1
    assert value(samples, "deephardway_jobs", queue="gpu", model="digits", state="queued") == 0
    assert ("deephardway_jobs", frozenset({"queue": "gpu", "model": "fashion", "state": "queued"}.items())) in samples
    assert not [key for key in samples if key[0] == "deephardway_jobs" and dict(key[1])["state"] == "succeeded"]
    assert value(samples, "deephardway_job_oldest_waiting_seconds", queue="gpu") > 0
    submitted = "deephardway_jobs_submitted_total"
    assert value(samples, submitted, model="text", queue="gpu") - value(before, submitted, model="text",
                                                                       queue="gpu") == len(PRIORITIES)


@pytest.mark.django_db(transaction=True)
def test_a_job_saved_in_a_rolled_back_transaction_is_not_counted(client, user, make_job):
    before = scrape(client)
    with pytest.raises(RuntimeError), transaction.atomic():
        make_job(user)
        raise RuntimeError("rolled back")
    make_job(user)
    submitted = "deephardway_jobs_submitted_total"
    assert value(scrape(client), submitted, model="text", queue="gpu") - value(before, submitted, model="text",
                                                                               queue="gpu") == 1


def test_the_admin_job_list_shows_each_queue_in_etcd(client, staff, site_celery, settings):
    client.force_login(staff)
    for index, priority in enumerate(PRIORITIES):
        submit(client, "text", {"prompt": f"admin {index}"}, priority)
    response = client.get("/admin/jobs/job/")
    assert response.status_code == 200
    row = next(row for row in response.context["broker_queues"] if row["queue"] == "gpu")
    assert (row["ready"], row["unacked"], row["consumers"]) == (len(PRIORITIES), 0, gpu_consumers(settings))
    assert row["by_priority"] == "p9:2 p5:1 p2:1"
    html = response.content.decode()
    assert 'id="broker-queues"' in html and "<td>p9:2 p5:1 p2:1</td>" in html


def test_the_admin_job_list_says_when_etcd_does_not_answer(client, staff, settings):
    settings.ETCD_URL = f"etcdv3://127.0.0.1:{free_port()}"  # nothing listens there
    client.force_login(staff)
    response = client.get("/admin/jobs/job/")
    assert response.status_code == 200
    assert "etcd did not answer" in response.content.decode()


def test_a_metrics_token_is_required_once_set(client, settings, site_celery):
    settings.METRICS_TOKEN = "s3cret-metrics-token"
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    response = client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-metrics-token")
    assert response.status_code == 200 and b"deephardway_broker_up 1.0" in response.content


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)  # watch_jobs' changes are counted when they commit
def test_a_real_run_is_counted_by_the_site_and_the_worker(client, staff, settings, start_model_worker, watcher):
    """Jobs wait (no worker yet), a worker with its exporter runs them, watch_jobs records them:
    every number on both /metrics pages matches what was submitted."""
    settings.JOBS_MAX_QUEUED_PER_OWNER = 100
    client.force_login(staff)
    before = scrape(client)
    text_ids = [submit(client, "text", {"prompt": f"HAMLET {i}:", "length": 20, "seed": i}, priority)
                for i, priority in enumerate(PRIORITIES)]
    waiting = scrape(client)
    assert [value(waiting, "deephardway_queue_ready_messages", queue="gpu", priority=str(p))
            for p in (9, 5, 2)] == [2, 1, 1]

    port = free_port()
    start_model_worker(WORKER_METRICS_PORT=str(port), WORKER_METRICS_ADDR="127.0.0.1")
    digit_ids = [submit(client, "digits", {"image": png_data_url(lambda d, x=x: d.line([(x, 40), (x + 10, 240)],
                                                                                       fill=0, width=24))})
                 for x in range(100, 100 + 10 * DIGIT_JOBS, 10)]  # distinct strokes: distinct jobs
    ids = text_ids + digit_ids

    def all_succeeded() -> bool:
        watcher.apply_pending(timeout=0.2)
        return Job.objects.filter(pk__in=ids, status=Status.SUCCEEDED).count() == len(ids)

    wait_until(all_succeeded, timeout=120, interval=0.1, message="every job succeeded")
    site = scrape(client)
    assert value(site, "deephardway_queue_consumers", queue="gpu") == gpu_consumers(settings) >= 1  # the worker
    assert sum(value(site, "deephardway_queue_ready_messages", queue="gpu", priority=str(p)) for p in range(10)) == 0
    assert value(site, "deephardway_queue_unacked_messages", queue="gpu") == 0
    for model, count in (("text", len(text_ids)), ("digits", len(digit_ids))):
        assert value(site, "deephardway_jobs", queue="gpu", model=model, state="running") == 0
        assert value(site, "deephardway_jobs", queue="gpu", model=model, state="queued") == 0

        def delta(name: str, **labels: str) -> float:
            return value(site, name, **labels) - value(before, name, **labels)

        assert delta("deephardway_job_total_seconds_count", model=model, outcome="succeeded") == count
        started = Job.objects.filter(pk__in=ids, model=model, started_at__isnull=False).count()
        assert delta("deephardway_job_wait_seconds_count", model=model, queue="gpu") == started
        assert delta("deephardway_job_run_seconds_count", model=model, outcome="succeeded") == started
        assert delta("deephardway_job_total_seconds_bucket", model=model, outcome="succeeded", le="+Inf") == count

    worker = scrape_url(f"http://127.0.0.1:{port}/metrics")
    task = "jobs.tasks.run_model"
    assert value(worker, "deephardway_worker_tasks_total", task=task, state="success") == len(ids)
    assert value(worker, "deephardway_worker_task_seconds_count", task=task) == len(ids)
    assert value(worker, "deephardway_worker_tasks_running", task=task) == 0
    assert value(worker, "deephardway_worker_batch_size_sum", model="digits") == DIGIT_JOBS  # one row each
    assert 1 <= value(worker, "deephardway_worker_batch_size_count", model="digits") <= DIGIT_JOBS
