"""GET /api/jobs/<id>/input: the submitted image, for its owner only."""
from __future__ import annotations

import base64

import pytest
from django.core.files.base import ContentFile

pytestmark = pytest.mark.django_db


@pytest.fixture
def job_with_image(user, make_job, one_drawing):
    job = make_job(user, model="digits", input={"image": {"$file": "image/png", "bytes": 10}})
    job.input_file.save(f"{job.id}.png", ContentFile(base64.b64decode(one_drawing.split(",", 1)[1])))
    return job


def test_it_serves_the_owner_their_image(client, user, job_with_image):
    client.force_login(user)
    response = client.get(f"/api/jobs/{job_with_image.id}/input")
    assert response.status_code == 200
    assert response["Content-Type"] == "image/png"
    assert b"".join(response.streaming_content).startswith(b"\x89PNG")


def test_it_hides_the_image_from_others(client, other_user, job_with_image):
    client.force_login(other_user)
    assert client.get(f"/api/jobs/{job_with_image.id}/input").status_code == 404


def test_it_answers_404_for_a_job_without_image(client, user, make_job):
    job = make_job(user)
    client.force_login(user)
    assert client.get(f"/api/jobs/{job.id}/input").status_code == 404
