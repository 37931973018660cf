"""POST /api/jobs: refusals (nothing created, nothing queued) and accepted submissions."""
from __future__ import annotations

import json

import pytest

from jobs.models import ApiToken, Job, Status

pytestmark = pytest.mark.django_db


def post(client, body, **extra):
    return client.post("/api/jobs", json.dumps(body), content_type="application/json", **extra)


def test_it_refuses_an_unknown_model(client):
    response = post(client, {"model": "poetry", "input": {}})
    assert response.status_code == 400
    assert response.json()["field"] == "model"
    assert "digits, text, fashion" in response.json()["error"]
    assert Job.objects.count() == 0


def test_it_names_the_field_and_the_limit_of_a_bad_prompt(client):
    response = post(client, {"model": "text", "input": {"prompt": "x" * 501}})
    assert response.status_code == 400
    assert response.json() == {"error": "input.prompt: is 501 characters; the limit is 500",
                               "field": "input.prompt"}
    assert Job.objects.count() == 0


def test_it_refuses_a_blank_drawing(client, blank_drawing):
    response = post(client, {"model": "digits", "input": {"image": blank_drawing}})
    assert response.status_code == 400
    assert response.json()["field"] == "input.image"
    assert "no drawing found" in response.json()["error"]
    assert Job.objects.count() == 0


def test_it_refuses_a_temperature_out_of_range(client):
    response = post(client, {"model": "text", "input": {"prompt": "hi", "temperature": 5}})
    assert response.status_code == 400
    assert response.json()["error"] == "input.temperature: is 5; must be from 0.1 to 2.0"
    assert Job.objects.count() == 0


def test_it_refuses_a_body_over_the_limit_with_413(client, settings):
    settings.JOBS_MAX_REQUEST_BYTES = 1000
    response = post(client, {"model": "text", "input": {"prompt": "a" * 2000}})
    assert response.status_code == 413
    assert response.json()["error"].endswith("the limit is 1000 bytes")
    assert Job.objects.count() == 0


def test_it_refuses_a_body_that_is_not_json(client):
    response = client.post("/api/jobs", "model=text", content_type="text/plain")
    assert response.status_code == 415
    assert "application/json" in response.json()["error"]


def test_it_refuses_malformed_json(client):
    response = client.post("/api/jobs", "{nope", content_type="application/json")
    assert response.status_code == 400
    assert "not valid JSON" in response.json()["error"]


def test_it_refuses_unknown_top_level_fields(client):
    response = post(client, {"model": "text", "input": {}, "urgent": True})
    assert response.status_code == 400
    assert response.json()["field"] == "urgent"


def test_it_refuses_a_priority_above_the_non_staff_limit(client, settings):
    settings.JOBS_MAX_PRIORITY_NON_STAFF = 5
    response = post(client, {"model": "text", "input": {"prompt": "hi"}, "priority": 9})
    assert response.status_code == 400
    assert response.json() == {"error": "priority must be from 0 to 5 (higher needs a staff account); got 9",
                               "field": "priority"}
    assert Job.objects.count() == 0


def test_it_refuses_a_caller_over_the_queued_cap_with_429(client, user, make_job, settings):
    settings.JOBS_MAX_QUEUED_PER_OWNER = 2
    make_job(user)
    make_job(user)
    client.force_login(user)
    response = post(client, {"model": "text", "input": {"prompt": "one more"}})
    assert response.status_code == 429
    assert response.json()["error"].startswith("you have 2 queued jobs; the limit is 2.")
    assert Job.objects.count() == 2


def test_it_does_not_count_running_or_finished_jobs_against_the_cap(client, user, make_job, settings,
                                                                     site_celery):
    settings.JOBS_MAX_QUEUED_PER_OWNER = 1
    make_job(user, status=Status.RUNNING)
    make_job(user, status=Status.SUCCEEDED)
    client.force_login(user)
    response = post(client, {"model": "text", "input": {"prompt": "fits"}})
    assert response.status_code == 202
    assert Job.objects.count() == 3


def test_it_enforces_csrf_for_a_logged_in_browser_session(user):
    from django.test import Client

    browser = Client(enforce_csrf_checks=True)
    browser.force_login(user)
    response = post(browser, {"model": "text", "input": {"prompt": "hi"}})
    assert response.status_code == 403
    assert "CSRF" in response.json()["error"]
    assert Job.objects.count() == 0


def test_it_refuses_an_unknown_api_token(client):
    response = post(client, {"model": "text", "input": {"prompt": "hi"}}, HTTP_AUTHORIZATION="Bearer dhw_nope")
    assert response.status_code == 401
    assert Job.objects.count() == 0


def test_it_accepts_an_api_token_without_csrf(user, site_celery):
    from django.test import Client

    _, key = ApiToken.issue(user, "script")
    response = post(Client(enforce_csrf_checks=True), {"model": "text", "input": {"prompt": "from a script"}},
                    HTTP_AUTHORIZATION=f"Bearer {key}")
    assert response.status_code == 202
    assert Job.objects.get().owner == user


def test_it_queues_a_job_and_answers_202(client, site_celery, queued_messages):
    response = post(client, {"model": "text", "input": {"prompt": "To be", "length": 50}, "priority": 3})
    assert response.status_code == 202
    body = response.json()
    job = Job.objects.get()
    assert body["id"] == str(job.id)
    assert body["status_url"] == f"/api/jobs/{job.id}" == response["Location"]
    assert body["events_url"] == f"/api/jobs/{job.id}/events"
    assert (job.status, job.model, job.priority) == (Status.QUEUED, "text", 3)
    assert job.owner_key == f"session:{client.session.session_key}"
    assert job.input == {"mode": "generate", "prompt": "To be", "length": 50, "temperature": 0.8}
    messages = queued_messages()
    assert [(m["id"], m["task"], m["priority"]) for m in messages] == [(str(job.id), "jobs.tasks.run_model", 3)]
    assert messages[0]["args"] == ["text", job.input]


def test_it_returns_the_existing_job_for_an_identical_request(client, site_celery, queued_messages):
    first = post(client, {"model": "text", "input": {"prompt": "same"}})
    second = post(client, {"model": "text", "input": {"prompt": "same", "temperature": 0.8}})
    assert (first.status_code, second.status_code) == (202, 200)
    assert first.json()["id"] == second.json()["id"]
    assert Job.objects.count() == 1
    assert len(queued_messages()) == 1


def test_it_makes_a_new_job_for_another_owner_with_the_same_input(client, user, site_celery):
    assert post(client, {"model": "text", "input": {"prompt": "same"}}).status_code == 202
    client.force_login(user)
    assert post(client, {"model": "text", "input": {"prompt": "same"}}).status_code == 202
    assert Job.objects.count() == 2


def test_it_stores_a_drawing_and_sends_the_worker_pixels(client, site_celery, queued_messages, one_drawing):
    response = post(client, {"model": "digits", "input": {"image": one_drawing}})
    assert response.status_code == 202
    job = Job.objects.get()
    assert job.input == {"image": {"$file": "image/png", "bytes": job.input_file.size}}
    assert job.input_file.name.endswith(".png")
    (message,) = queued_messages()
    payload = message["args"][1]
    assert set(payload) == {"pixels", "width"} and payload["width"] == 64
    assert "data:image" not in json.dumps(message)


def test_it_accepts_a_photo_as_multipart(client, site_celery, queued_messages, one_drawing):
    import base64

    from django.core.files.uploadedfile import SimpleUploadedFile

    photo = SimpleUploadedFile("shirt.html", base64.b64decode(one_drawing.split(",", 1)[1]), "text/html")
    response = client.post("/api/jobs", {"model": "fashion", "priority": "4", "image": photo})
    assert response.status_code == 202
    job = Job.objects.get()
    assert (job.model, job.priority) == ("fashion", 4)
    assert job.input_file.name.endswith(".png")  # named by its content, not by the client
    assert set(queued_messages()[0]["args"][1]) == {"pixels", "width"}


def test_it_refuses_an_upload_that_is_not_an_image(client):
    from django.core.files.uploadedfile import SimpleUploadedFile

    response = client.post("/api/jobs", {"model": "fashion",
                                         "image": SimpleUploadedFile("a.png", b"not an image", "image/png")})
    assert response.status_code == 400
    assert response.json()["field"] == "input.image"
    assert Job.objects.count() == 0


def test_it_refuses_an_unavailable_model_with_503(client, without_fashion_data, one_drawing):
    response = post(client, {"model": "fashion", "input": {"image": one_drawing}})
    assert response.status_code == 503
    assert response.json()["error"] == "model 'fashion' is unavailable: Fashion-MNIST is not installed"
    assert Job.objects.count() == 0


def test_it_caps_anonymous_jobs_per_address_whatever_the_session(site_celery, settings, user):
    from django.test import Client

    settings.JOBS_MAX_QUEUED_PER_ADDRESS = 2
    for prompt in ("one", "two"):
        assert post(Client(), {"model": "text", "input": {"prompt": prompt}}).status_code == 202
    refused = post(Client(), {"model": "text", "input": {"prompt": "three"}})   # a fresh session
    assert refused.status_code == 429
    assert refused.json()["error"].startswith("2 anonymous jobs from your address are queued; the limit is 2.")
    assert Job.objects.count() == 2
    signed_in = Client()
    signed_in.force_login(user)
    assert post(signed_in, {"model": "text", "input": {"prompt": "three"}}).status_code == 202


def test_it_reads_the_address_from_the_proxy_header_when_told(site_celery, settings):
    from django.test import Client

    settings.JOBS_CLIENT_ADDRESS_HEADER = "HTTP_X_FORWARDED_FOR"
    response = post(Client(), {"model": "text", "input": {"prompt": "proxied"}},
                    HTTP_X_FORWARDED_FOR="203.0.113.9, 198.51.100.7")
    assert response.status_code == 202
    assert Job.objects.get().client_address == "198.51.100.7"
