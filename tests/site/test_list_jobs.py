"""GET /api/jobs: the caller's jobs, newest first, paginated."""
from __future__ import annotations

import pytest

from jobs.models import Status

pytestmark = pytest.mark.django_db


def test_it_lists_only_the_callers_jobs_newest_first(client, user, other_user, make_job):
    old = make_job(user)
    new = make_job(user, status=Status.SUCCEEDED)
    make_job(other_user)
    client.force_login(user)
    response = client.get("/api/jobs")
    assert response.status_code == 200
    body = response.json()
    assert [j["id"] for j in body["jobs"]] == [str(new.id), str(old.id)]
    assert (body["count"], body["page"], body["pages"], body["next"]) == (2, 1, 1, None)


def test_it_paginates(client, user, make_job, settings):
    settings.JOBS_PAGE_SIZE = 2
    jobs = [make_job(user) for _ in range(5)]
    client.force_login(user)
    first = client.get("/api/jobs").json()
    assert first["next"] == "/api/jobs?page=2" and first["pages"] == 3
    last = client.get("/api/jobs?page=3").json()
    assert [j["id"] for j in last["jobs"]] == [str(jobs[0].id)]
    assert last["previous"] == "/api/jobs?page=2"


def test_it_refuses_a_page_out_of_range(client, user, make_job):
    client.force_login(user)
    response = client.get("/api/jobs?page=7")
    assert response.status_code == 400
    assert response.json() == {"error": "page must be a number from 1 to 1", "field": "page"}


def test_it_filters_by_status(client, user, make_job):
    make_job(user)
    done = make_job(user, status=Status.SUCCEEDED)
    client.force_login(user)
    assert [j["id"] for j in client.get("/api/jobs?status=succeeded").json()["jobs"]] == [str(done.id)]
    assert client.get("/api/jobs?status=finished").status_code == 400


def test_it_lists_nothing_for_a_new_anonymous_caller(client, make_job):
    make_job(session_key="somebody")
    assert client.get("/api/jobs").json()["jobs"] == []


def test_it_lists_everyones_jobs_for_staff_who_ask(client, staff, user, other_user, make_job):
    make_job(user)
    make_job(other_user)
    client.force_login(staff)
    assert client.get("/api/jobs").json()["count"] == 0
    assert client.get("/api/jobs?all=1").json()["count"] == 2


def test_it_ignores_all_for_non_staff(client, user, other_user, make_job):
    make_job(other_user)
    client.force_login(user)
    assert client.get("/api/jobs?all=1").json()["count"] == 0
