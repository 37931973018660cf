"""Django admin for jobs: staff only; list, filters, search; cancel and retry actions."""
from __future__ import annotations

import pytest

from jobs.models import Job, Status

pytestmark = pytest.mark.django_db


def test_it_lists_jobs_with_status_model_owner_progress_and_worker(client, staff, user, make_job):
    make_job(user, status=Status.RUNNING, progress=40, worker="gpu-7@rack")
    client.force_login(staff)
    response = client.get("/admin/jobs/job/")
    assert response.status_code == 200
    html = response.content.decode()
    for text in ("running", "alice", "40%", "gpu-7@rack", "text"):
        assert text in html


def test_it_filters_and_searches(client, staff, user, other_user, make_job):
    mine = make_job(user, status=Status.FAILED, error="ValueError: boom")
    make_job(other_user, status=Status.SUCCEEDED)
    client.force_login(staff)
    filtered = client.get("/admin/jobs/job/?status__exact=failed").content.decode()
    assert str(mine.id)[:8] in filtered and "1 job" in filtered
    assert str(mine.id)[:8] in client.get("/admin/jobs/job/?q=boom").content.decode()


def test_it_shows_result_and_error_readably(client, staff, user, make_job):
    job = make_job(user, status=Status.FAILED, error="ValueError: prompt too long", result=None)
    client.force_login(staff)
    html = client.get(f"/admin/jobs/job/{job.id}/change/").content.decode()
    assert "ValueError: prompt too long" in html


def test_it_is_staff_only(client, user):
    client.force_login(user)
    response = client.get("/admin/jobs/job/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_the_cancel_action_cancels_unfinished_jobs(client, staff, user, make_job, site_celery):
    waiting = make_job(user)
    done = make_job(user, status=Status.SUCCEEDED)
    client.force_login(staff)
    response = client.post("/admin/jobs/job/", {"action": "cancel_jobs", "index": 0, "_selected_action": [waiting.pk, done.pk]},
                           follow=True)
    assert response.status_code == 200
    assert "Cancel requested for 1 job(s)" in response.content.decode()
    assert Job.objects.get(pk=waiting.pk).cancel_requested_at is not None
    assert site_celery.backend.is_cancelled(str(waiting.pk))
    assert Job.objects.get(pk=done.pk).cancel_requested_at is None


def test_the_retry_action_queues_a_new_job_with_the_same_input(client, staff, user, make_job, site_celery,
                                                               queued_messages):
    failed = make_job(user, status=Status.FAILED, input={"mode": "generate", "prompt": "Once more",
                                                          "length": 40, "temperature": 0.5})
    client.force_login(staff)
    response = client.post("/admin/jobs/job/", {"action": "retry_jobs", "index": 0, "_selected_action": [failed.pk]}, follow=True)
    assert "Retried 1 job(s)" in response.content.decode()
    retry = Job.objects.exclude(pk=failed.pk).get()
    assert (retry.owner, retry.status, retry.input) == (user, Status.QUEUED, failed.input)
    assert [m["id"] for m in queued_messages()] == [str(retry.id)]


def test_a_token_made_in_the_admin_is_shown_once_and_works(client, staff, user, site_celery):
    import json
    import re

    from django.test import Client

    from jobs.models import ApiToken

    client.force_login(staff)
    response = client.post("/admin/jobs/apitoken/add/", {"user": user.pk, "name": "laptop"}, follow=True)
    key = re.search(r"(dhw_[\w-]+)", response.content.decode()).group(1)
    token = ApiToken.objects.get()
    assert (token.user, token.name) == (user, "laptop") and key not in token.key_hash
    answer = Client().post("/api/jobs", json.dumps({"model": "text", "input": {"prompt": "scripted"}}),
                           content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {key}")
    assert answer.status_code == 202
    assert Job.objects.get().owner == user
