"""GET /api/models: every model with its description, input schema, limits and availability."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.django_db


def test_it_lists_every_model_with_schema_and_limits(client):
    response = client.get("/api/models")
    assert response.status_code == 200
    models = {m["name"]: m for m in response.json()["models"]}
    assert list(models) == ["digits", "text", "fashion"]
    assert models["text"]["limits"]["prompt_max_chars"] == 500
    assert models["text"]["input_schema"]["properties"]["temperature"]["maximum"] == 2.0
    assert models["fashion"]["kind"] == "classify"
    assert "ten kinds of clothing and nothing else" in models["fashion"]["description"]
    assert all(isinstance(m["available"], bool) for m in models.values())


def test_it_says_why_a_model_is_unavailable(client, without_fashion_data):
    fashion = [m for m in client.get("/api/models").json()["models"] if m["name"] == "fashion"][0]
    assert (fashion["available"], fashion["unavailable_reason"]) == (False, "Fashion-MNIST is not installed")


def test_it_refuses_post(client):
    response = client.post("/api/models")
    assert response.status_code == 405
    assert response["Allow"] == "GET"
