"""Through a real model worker: the API, the event stream and watch_jobs together."""
from __future__ import annotations

import json

import pytest

from jobs.management.commands.watch_jobs import JobWatcher
from jobs.models import Job, Status
from tests.helpers import wait_until
from tests.site.test_job_events import Stream

pytestmark = [pytest.mark.slow, pytest.mark.django_db]


@pytest.fixture
def watcher(site_celery):
    running = JobWatcher(site_celery).start()
    yield running
    running.stop()


def caught_up(watcher: JobWatcher, job_id: str, predicate) -> Job:
    def check():
        watcher.apply_pending(timeout=0.2)
        job = Job.objects.get(pk=job_id)
        return job if predicate(job) else None

    return wait_until(check, timeout=30, message="job row caught up")


def test_a_job_runs_and_its_row_follows(client, start_model_worker, watcher):
    start_model_worker()
    body = {"model": "text", "input": {"prompt": "HAMLET:", "length": 60, "seed": 7}}
    job_id = client.post("/api/jobs", json.dumps(body), content_type="application/json").json()["id"]
    states = [b["data"] for b in Stream(client.get(f"/api/jobs/{job_id}/events")).rest() if b.get("event") == "state"]
    assert states[-1]["status"] == "succeeded" and len(states[-1]["result"]["text"]) == 60
    assert any(s["state"] == "PROGRESS" and s["partial"]["text"] for s in states)  # the text streamed in
    job = caught_up(watcher, job_id, lambda j: j.status == Status.SUCCEEDED)
    assert job.result["text"] == states[-1]["result"]["text"]
    assert job.worker and job.started_at <= job.finished_at


def test_a_running_job_stops_at_its_next_progress_point(client, start_model_worker, watcher):
    start_model_worker()
    body = {"model": "text", "input": {"prompt": "MACBETH:", "length": 1000}}
    job_id = client.post("/api/jobs", json.dumps(body), content_type="application/json").json()["id"]
    stream = Stream(client.get(f"/api/jobs/{job_id}/events"))
    while True:
        event = stream.next_event()["data"]
        if event["state"] == "PROGRESS":
            break
    assert client.delete(f"/api/jobs/{job_id}").status_code == 202
    states = [b["data"] for b in stream.rest() if b.get("event") == "state"]
    assert states[-1]["status"] == "cancelled"
    job = caught_up(watcher, job_id, lambda j: j.status == Status.CANCELLED)
    assert job.result is None and job.progress < 100
    assert job.error.startswith("cancelled")
