"""Browser pages render without a build step: model list, one page per model, My jobs."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.django_db


def test_home_lists_every_model(client):
    response = client.get("/")
    assert response.status_code == 200
    html = response.content.decode()
    for title in ("Handwritten digit", "Shakespeare continuation", "Clothing photo"):
        assert title in html
    assert "/static/frontend/app.js" in html and "csrftoken" in response.cookies


def test_each_model_has_its_page_and_widget(client):
    assert 'id="pad"' in client.get("/models/digits/").content.decode()
    assert 'id="prompt"' in client.get("/models/text/").content.decode()
    fashion = client.get("/models/fashion/").content.decode()
    assert 'id="photo"' in fashion
    assert "ten kinds of clothing and nothing else" in fashion


def test_an_unavailable_model_says_why(client, without_fashion_data):
    html = client.get("/models/fashion/").content.decode()
    assert "unavailable: Fashion-MNIST is not installed" in html
    assert 'id="submit" disabled' in html
    assert "unavailable: Fashion-MNIST is not installed" in client.get("/").content.decode()


def test_an_unknown_model_page_is_404(client):
    assert client.get("/models/poetry/").status_code == 404


def test_my_jobs_page_renders(client):
    response = client.get("/jobs/")
    assert response.status_code == 200
    assert 'id="job-list"' in response.content.decode()


def test_static_files_are_served_by_the_site(live_server):
    from urllib.request import urlopen

    for name in ("app.js", "jobs.js", "api.js", "draw.js", "site.css"):
        with urlopen(f"{live_server.url}/static/frontend/{name}") as response:
            assert response.status == 200
