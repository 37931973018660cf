"""GET /api/jobs/<id>/events: Server-Sent Events from the result backend's watch.

States are written through the real etcd result backend, as a worker writes them.
"""
from __future__ import annotations

import json

import pytest

from jobs.models import Status

pytestmark = pytest.mark.django_db


def parse(chunk: bytes | str) -> dict:
    """One SSE block as {"event", "id", "data", "comment"}."""
    text = chunk.decode() if isinstance(chunk, bytes) else chunk
    block: dict = {}
    for line in text.strip().splitlines():
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "":
            block["comment"] = value
        elif name == "data":
            block["data"] = json.loads(value)
        else:
            block[name] = value
    return block


class Stream:
    def __init__(self, response):
        self.response = response
        self.chunks = iter(response.streaming_content)

    def next(self) -> dict:
        return parse(next(self.chunks))

    def next_event(self, kind: str = "state") -> dict:
        while True:
            block = self.next()
            if block.get("event") == kind:
                return block

    def rest(self) -> list[dict]:
        return [parse(chunk) for chunk in self.chunks]


@pytest.fixture
def owner_client(client, user):
    client.force_login(user)
    return client


def test_it_streams_each_state_change_and_ends_at_the_final_one(owner_client, user, make_job, site_celery):
    job = make_job(user)
    backend = site_celery.backend
    backend.store_result(str(job.id), {"pid": 1, "hostname": "w1@box"}, "STARTED")
    response = owner_client.get(f"/api/jobs/{job.id}/events")
    assert response.status_code == 200
    assert response["Content-Type"] == "text/event-stream"
    stream = Stream(response)
    assert stream.next() == {"retry": "2000"}
    started = stream.next_event()
    assert started["data"]["status"] == "running" and int(started["id"]) > 0

    backend.store_result(str(job.id), {"progress": 50, "text": "O Romeo"}, "PROGRESS")
    progress = stream.next_event()
    assert progress["data"]["progress"] == 50
    assert progress["data"]["partial"] == {"text": "O Romeo"}
    assert int(progress["id"]) > int(started["id"])

    backend.store_result(str(job.id), {"text": "O Romeo, Romeo"}, "SUCCESS")
    done = stream.next_event()
    assert (done["data"]["status"], done["data"]["result"]) == ("succeeded", {"text": "O Romeo, Romeo"})
    assert stream.rest() == []  # the stream ends at the final state


@pytest.mark.django_db(transaction=True)  # the hang-up ends the request, which closes the connection
def test_a_reconnecting_client_misses_nothing_and_sees_nothing_twice(owner_client, user, make_job, site_celery):
    job = make_job(user)
    backend = site_celery.backend
    backend.store_result(str(job.id), {"progress": 10}, "PROGRESS")
    first = Stream(owner_client.get(f"/api/jobs/{job.id}/events"))
    seen = first.next_event()
    first.response.close()
    backend.store_result(str(job.id), {"progress": 60}, "PROGRESS")   # while disconnected
    backend.store_result(str(job.id), {"progress": 90}, "PROGRESS")
    backend.store_result(str(job.id), {"top": [{"label": "3", "probability": 1.0}]}, "SUCCESS")

    again = Stream(owner_client.get(f"/api/jobs/{job.id}/events", HTTP_LAST_EVENT_ID=seen["id"]))
    events = [b for b in again.rest() if b.get("event") == "state"]
    assert [e["data"]["progress"] for e in events] == [60, 90, 100]
    assert events[-1]["data"]["status"] == "succeeded"
    assert len({e["id"] for e in events}) == 3 and min(int(e["id"]) for e in events) > int(seen["id"])


def test_it_tells_a_waiting_job_its_place_in_line(owner_client, user, other_user, make_job, site_celery):
    make_job(other_user, priority=9)
    make_job(other_user, priority=5)
    job = make_job(user, priority=5)
    stream = Stream(owner_client.get(f"/api/jobs/{job.id}/events"))
    assert stream.next_event("position")["data"] == {"id": str(job.id), "jobs_ahead": 2}
    pending = stream.next_event()
    assert pending["data"]["status"] == "queued" and "id" not in pending  # nothing stored yet: no revision


def test_it_sends_heartbeats_and_new_positions_while_the_job_waits(owner_client, user, other_user, make_job,
                                                                   site_celery, settings):
    settings.JOBS_SSE_HEARTBEAT_SECONDS = 1
    settings.JOBS_SSE_POSITION_SECONDS = 1
    ahead = make_job(other_user)
    job = make_job(user)
    stream = Stream(owner_client.get(f"/api/jobs/{job.id}/events"))
    assert stream.next_event("position")["data"]["jobs_ahead"] == 1
    stream.next_event()  # queued
    assert stream.next() == {"comment": "heartbeat"}
    ahead.status = Status.RUNNING
    ahead.save()
    assert stream.next_event("position")["data"]["jobs_ahead"] == 0
    stream.response.close()


def test_it_answers_a_finished_job_from_the_database(owner_client, user, make_job):
    job = make_job(user, status=Status.FAILED, error="ValueError: bad", revision=77)
    stream = Stream(owner_client.get(f"/api/jobs/{job.id}/events"))
    stream.next()
    final = stream.next_event()
    assert (final["id"], final["data"]["status"], final["data"]["error"]) == ("77", "failed", "ValueError: bad")
    assert stream.rest() == []


def test_it_hides_another_owners_stream(owner_client, other_user, make_job):
    job = make_job(other_user)
    assert owner_client.get(f"/api/jobs/{job.id}/events").status_code == 404
