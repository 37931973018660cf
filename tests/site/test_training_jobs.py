"""Training as jobs: one train_model job per missing model on the real queue (deduplicated), what
/api/models and the pages say while a model trains, the 503 a request to it gets, and who may
watch or cancel a training job."""
from __future__ import annotations

import io
import json

import pytest
from django.core.management import call_command

from jobs.models import TRAINING_OWNER, Job, Status
from jobs.training import submit_training

pytestmark = pytest.mark.django_db


@pytest.fixture
def untrained(settings, tmp_path):
    """An empty MODEL_DIR: nothing is trained yet (a fresh clone's `make run`)."""
    settings.MODEL_DIR = tmp_path / "models"
    return settings.MODEL_DIR


def post(client, body):
    return client.post("/api/jobs", json.dumps(body), content_type="application/json")


def test_it_queues_one_training_job_per_model(site_celery, queued_messages, untrained):
    job, created = submit_training("digits", 3)
    again, created_again = submit_training("digits")
    assert (created, created_again, again.pk) == (True, False, job.pk)
    assert [(m["task"], m["id"], m["args"]) for m in queued_messages()] == [
        ("jobs.tasks.train_model", str(job.id), ["digits"])]
    job.refresh_from_db()
    assert (job.owner_key, job.status, job.model, job.input) == (TRAINING_OWNER, Status.QUEUED, "digits",
                                                                 {"train": True, "epochs": 3})
    assert job.to_dict()["kind"] == "train"


def test_train_models_queue_twice_queues_once(site_celery, queued_messages, untrained):
    runs = []
    for _ in range(2):
        out = io.StringIO()
        call_command("train_models", "--queue", "--missing", "--model", "digits", "--worker-wait", "0",
                     "--no-follow", stdout=out, stderr=io.StringIO())
        runs.append(out.getvalue())
    job = Job.objects.get()
    assert f"digits: training job {job.id} queued" in runs[0]
    assert f"digits: training job {job.id} already queued" in runs[1]
    assert [m["id"] for m in queued_messages()] == [str(job.id)]


def test_a_trained_model_is_not_queued_again(site_celery, queued_messages, untrained):
    from tests.ml.tiny import train_tiny

    train_tiny("digits", untrained)
    assert submit_training("digits") == (None, False)
    assert Job.objects.count() == 0 and queued_messages() == []


def test_a_request_to_a_model_in_training_gets_503_saying_when(client, site_celery, untrained, one_drawing):
    job, _ = submit_training("digits")
    response = post(client, {"model": "digits", "input": {"image": one_drawing}})
    assert response.status_code == 503
    body = response.json()
    assert body["field"] == "model" and body["training"]["id"] == str(job.id)
    assert "still training (training is queued (0 job(s) ahead))" in body["error"]
    assert "ready in about 30 s" in body["error"] and int(response["Retry-After"]) == 30  # digits expects 30 s

    # As watch_jobs records the worker's PROGRESS: the answer names the epoch and the time left.
    partial = {"stage": "training", "epoch": 4, "epochs": 30, "metrics": {"loss": 0.3, "accuracy": 0.9},
               "eta_seconds": 42.0}
    Job.objects.filter(pk=job.pk).update(status=Status.RUNNING, progress=13, partial=partial)
    response = post(client, {"model": "digits", "input": {"image": one_drawing}})
    assert response.status_code == 503 and response["Retry-After"] == "42"
    assert "epoch 4 of 30 · loss 0.3000 · accuracy 90.0% · about 42 s left" in response.json()["error"]
    assert Job.objects.count() == 1  # the refused requests made no job


def test_a_model_queued_behind_another_is_ready_after_both(client, site_celery, untrained):
    digits, _ = submit_training("digits")
    text, _ = submit_training("text")
    Job.objects.filter(pk=digits.pk).update(status=Status.RUNNING, partial={"stage": "training", "epoch": 1,
                                                                              "epochs": 30, "eta_seconds": 20})
    models = {m["name"]: m for m in client.get("/api/models").json()["models"]}
    assert models["digits"]["state"] == models["text"]["state"] == "training"
    assert models["digits"]["training"]["ready_in_seconds"] == 20
    assert models["text"]["training"]["ready_in_seconds"] == 20 + 240  # text's own estimate after digits
    assert models["text"]["training"]["id"] == str(text.id) and models["text"]["card"] is None


def test_api_models_says_untrained_then_ready_with_the_card(client, untrained):
    from tests.ml.tiny import train_tiny

    digits = next(m for m in client.get("/api/models").json()["models"] if m["name"] == "digits")
    assert (digits["state"], digits["ready"], digits["card"], digits["training"]) == ("untrained", False, None, None)
    card = train_tiny("digits", untrained)
    digits = next(m for m in client.get("/api/models").json()["models"] if m["name"] == "digits")
    assert (digits["state"], digits["ready"]) == ("ready", True)
    assert digits["card"]["metrics"] == card["metrics"] and digits["card"]["data_source"].startswith("scikit-learn")


def test_the_model_page_shows_the_training_and_keeps_the_button_off(client, site_celery, untrained):
    job, _ = submit_training("digits")
    html = client.get("/models/digits/").content.decode()
    assert 'id="training" hidden' not in html and 'data-state="training"' in html
    assert 'id="submit" disabled' in html and str(job.id) in html  # the page's JSON names the job
    home = client.get("/").content.decode()
    assert 'data-model="digits" data-state="training"' in home


def test_an_untrained_model_page_says_how_to_train_it(client, untrained):
    html = client.get("/models/digits/").content.decode()
    assert "not trained yet" in html and "train_models --model digits" in html
    assert 'id="submit" disabled' in html


def test_anyone_may_watch_a_training_job_but_only_staff_cancel_it(client, site_celery, untrained, staff):
    job, _ = submit_training("digits")
    assert client.get(f"/api/jobs/{job.id}").json()["kind"] == "train"
    assert [j["id"] for j in client.get("/api/jobs").json()["jobs"]] == [str(job.id)]  # in My jobs
    refused = client.delete(f"/api/jobs/{job.id}")
    assert refused.status_code == 403 and "only staff may cancel it" in refused.json()["error"]
    assert Job.objects.get(pk=job.pk).cancel_requested_at is None
    client.force_login(staff)
    assert client.delete(f"/api/jobs/{job.id}").status_code == 202
    assert Job.objects.get(pk=job.pk).cancel_requested_at is not None


def test_retrying_a_finished_training_job_retrains(site_celery, queued_messages, untrained):
    from jobs import services

    job, _ = submit_training("digits", 2)
    queued_messages()  # taken: as if a worker ran it
    Job.objects.filter(pk=job.pk).update(status=Status.SUCCEEDED)
    job.refresh_from_db()
    again = services.retry(job)
    assert again.pk != job.pk and again.is_training and again.input == {"train": True, "epochs": 2}
    assert [(m["task"], m["id"]) for m in queued_messages()] == [("jobs.tasks.train_model", str(again.id))]
