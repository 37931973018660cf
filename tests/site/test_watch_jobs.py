"""watch_jobs: Job rows follow their tasks' states as the result backend stores them.

The states are written through the real etcd result backend, exactly as a worker writes
them (``backend.store_result``), so these tests need no worker.
"""
from __future__ import annotations

import pytest

from jobs.management.commands.watch_jobs import JobWatcher
from jobs.models import Job, Status
from tests.helpers import wait_until

pytestmark = pytest.mark.django_db


@pytest.fixture
def watcher(site_celery):
    running = JobWatcher(site_celery).start()
    yield running
    running.stop()


def apply_until(watcher: JobWatcher, job: Job, predicate, timeout: float = 10.0) -> Job:
    def done():
        watcher.apply_pending(timeout=0.2)
        job.refresh_from_db()
        return predicate(job)

    wait_until(done, timeout=timeout, message="job update")
    return job


def test_it_follows_a_job_from_start_to_success(watcher, site_celery, make_job, user):
    job = make_job(user)
    backend = site_celery.backend
    backend.store_result(str(job.id), {"pid": 42, "hostname": "gpu-1@box"}, "STARTED")
    apply_until(watcher, job, lambda j: j.status == Status.RUNNING)
    assert (job.worker, job.progress) == ("gpu-1@box", 0)
    assert job.started_at is not None

    backend.store_result(str(job.id), {"progress": 40, "text": "Wherefore"}, "PROGRESS")
    apply_until(watcher, job, lambda j: j.progress == 40)
    assert job.partial == {"text": "Wherefore"}

    backend.store_result(str(job.id), {"text": "Wherefore art thou"}, "SUCCESS")
    apply_until(watcher, job, lambda j: j.status == Status.SUCCEEDED)
    assert (job.progress, job.result, job.partial) == (100, {"text": "Wherefore art thou"}, None)
    assert job.finished_at >= job.started_at


def test_it_records_a_failure_readably(watcher, site_celery, make_job, user):
    job = make_job(user)
    site_celery.backend.store_result(str(job.id), ValueError("prompt: too long"), "FAILURE")
    apply_until(watcher, job, lambda j: j.status == Status.FAILED)
    assert job.error == "ValueError: prompt: too long"


def test_it_never_moves_a_finished_job(watcher, site_celery, make_job, user):
    job = make_job(user)
    backend = site_celery.backend
    backend.mark_as_revoked(str(job.id), reason="cancelled")
    apply_until(watcher, job, lambda j: j.status == Status.CANCELLED)
    backend.store_result(str(job.id), {"pid": 1, "hostname": "late@box"}, "STARTED")
    watcher.apply_pending(timeout=1.0)
    job.refresh_from_db()
    assert job.status == Status.CANCELLED and job.worker == ""


def test_it_catches_up_on_changes_made_while_it_was_down(site_celery, make_job, user):
    done, running = make_job(user), make_job(user)
    site_celery.backend.store_result(str(done.id), {"top": [{"label": "7", "probability": 0.9}]}, "SUCCESS")
    site_celery.backend.store_result(str(running.id), {"progress": 70}, "PROGRESS")
    watcher = JobWatcher(site_celery).start()   # started after the changes
    try:
        apply_until(watcher, done, lambda j: j.status == Status.SUCCEEDED)
        apply_until(watcher, running, lambda j: j.progress == 70)
    finally:
        watcher.stop()
    assert done.result == {"top": [{"label": "7", "probability": 0.9}]}
    assert running.status == Status.RUNNING


def test_it_ignores_tasks_that_are_not_jobs(watcher, site_celery):
    site_celery.backend.store_result("not-a-job", 4, "SUCCESS")
    assert watcher.apply_pending(timeout=2.0) == 0
    assert Job.objects.count() == 0
