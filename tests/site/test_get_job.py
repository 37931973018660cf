"""GET /api/jobs/<id>: the owner (or staff) sees the job; anyone else gets 404."""
from __future__ import annotations

import pytest

from jobs.models import Status

pytestmark = pytest.mark.django_db


def test_it_shows_the_owner_their_job(client, user, make_job):
    job = make_job(user, status=Status.SUCCEEDED, progress=100, result={"text": "Romeo"})
    client.force_login(user)
    response = client.get(f"/api/jobs/{job.id}")
    assert response.status_code == 200
    body = response.json()
    assert (body["id"], body["status"], body["progress"], body["result"]) == (str(job.id), "succeeded", 100,
                                                                              {"text": "Romeo"})
    assert body["jobs_ahead"] is None


def test_it_hides_another_owners_job(client, user, other_user, make_job):
    job = make_job(other_user)
    client.force_login(user)
    response = client.get(f"/api/jobs/{job.id}")
    assert response.status_code == 404
    assert response.json()["error"] == f"no job {job.id} among yours"


def test_it_hides_a_session_job_from_another_session(client, make_job):
    job = make_job(session_key="someone-else-entirely")
    assert client.get(f"/api/jobs/{job.id}").status_code == 404


def test_it_shows_staff_any_job(client, staff, user, make_job):
    job = make_job(user)
    client.force_login(staff)
    assert client.get(f"/api/jobs/{job.id}").status_code == 200


def test_it_counts_the_jobs_ahead_in_the_queue(client, user, other_user, make_job):
    make_job(other_user, priority=9)             # more urgent: ahead
    make_job(other_user, priority=5)             # same priority, earlier: ahead
    job = make_job(user, priority=5)
    make_job(other_user, priority=5)             # later: behind
    make_job(other_user, priority=7, status=Status.RUNNING)  # running: not waiting
    client.force_login(user)
    assert client.get(f"/api/jobs/{job.id}").json()["jobs_ahead"] == 2


def test_it_answers_404_for_a_malformed_id(client):
    assert client.get("/api/jobs/not-a-uuid").status_code == 404
