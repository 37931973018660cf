"""GET /healthz: 200 when the database and etcd answer; 503 naming the one that does not."""
from __future__ import annotations

import pytest

from scripts.etcd_server import free_port

pytestmark = pytest.mark.django_db


def test_it_answers_ok_when_the_database_and_etcd_answer(client, site_celery):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"ok": True, "database": "ok", "etcd": "ok"}
    assert "sessionid" not in response.cookies  # probes do not make sessions


def test_it_answers_503_naming_etcd_when_etcd_is_down(client, settings):
    settings.ETCD_URL = f"etcdv3://127.0.0.1:{free_port()}"  # nothing listens there
    response = client.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert (body["ok"], body["database"]) == (False, "ok")
    assert body["etcd"].startswith("unreachable: ")


def test_it_takes_only_get(client):
    assert client.post("/healthz").status_code == 405
