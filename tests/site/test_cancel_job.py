"""DELETE /api/jobs/<id>: cancel a queued job (it never starts) or a running one (it stops at
its next progress point); a finished job cannot be cancelled."""
from __future__ import annotations

import pytest

from jobs.management.commands.watch_jobs import JobWatcher
from jobs.models import Job, Status
from tests.helpers import wait_until

pytestmark = pytest.mark.django_db


def test_it_cancels_a_queued_job(client, user, site_celery, make_job):
    job = make_job(user)
    watcher = JobWatcher(site_celery).start()
    client.force_login(user)
    try:
        response = client.delete(f"/api/jobs/{job.id}")
        assert response.status_code == 202
        assert response.json()["cancel_requested"] is True

        def cancelled():
            watcher.apply_pending(timeout=0.2)
            job.refresh_from_db()
            return job.status == Status.CANCELLED

        wait_until(cancelled, timeout=10, message="job cancelled")
    finally:
        watcher.stop()
    assert job.cancel_requested_at is not None and job.finished_at is not None
    assert job.error.startswith("cancelled")


def test_it_asks_a_running_job_to_stop(client, user, site_celery, make_job):
    job = make_job(user, status=Status.RUNNING)
    client.force_login(user)
    response = client.delete(f"/api/jobs/{job.id}")
    assert response.status_code == 202
    job.refresh_from_db()
    assert job.status == Status.RUNNING  # until the task reaches its next progress point
    assert job.cancel_requested_at is not None
    assert site_celery.backend.is_cancelled(str(job.id))


def test_it_refuses_to_cancel_a_finished_job(client, user, site_celery, make_job):
    job = make_job(user, status=Status.SUCCEEDED)
    client.force_login(user)
    response = client.delete(f"/api/jobs/{job.id}")
    assert response.status_code == 409
    assert response.json()["error"] == f"job {job.id} already succeeded; there is nothing to cancel"
    job.refresh_from_db()
    assert job.cancel_requested_at is None


def test_it_does_not_let_others_cancel(client, user, other_user, make_job):
    job = make_job(other_user)
    client.force_login(user)
    assert client.delete(f"/api/jobs/{job.id}").status_code == 404
    assert Job.objects.get(pk=job.pk).cancel_requested_at is None


def test_it_frees_the_callers_queue_slot(client, user, site_celery, make_job, settings):
    settings.JOBS_MAX_QUEUED_PER_OWNER = 1
    job = make_job(user)
    client.force_login(user)
    client.delete(f"/api/jobs/{job.id}")
    response = client.post("/api/jobs", {"model": "text", "input": '{"prompt": "next"}'})
    assert response.status_code == 202
