"""Job isolation: no caller can read, stream, fetch the image of, list or cancel another owner's job.

Owners are two signed-in users, two anonymous browser sessions and an API-token user; each
submits a real job through the API (the real etcd broker behind it). Another owner's job answers
404, word for word what a job that does not exist answers (docs/api.md), so ids do not leak.
Staff see and cancel every job. A refused cancel changes nothing in the database or the result
backend, and sends no revoke: a real worker, listening to the broadcasts, never hears of it.
"""
from __future__ import annotations

import itertools
import json
import logging
import socket
import uuid

import pytest
from django.test import Client

from jobs.models import ApiToken, Job, Status
from tests.helpers import wait_until
from tests.site.fixtures import *  # noqa: F403 - the site's fixtures: site_celery, user, one_drawing, ...
from tests.site.fixtures import SITE_PREFIX

logger = logging.getLogger(__name__)
pytestmark = pytest.mark.django_db

OWNERS = ("alice", "bob", "anonymous A", "anonymous B", "token carol")
PAIRS = list(itertools.permutations(OWNERS, 2))
#: Seconds to wait for a worker to report a revoke it received by broadcast.
REVOKE_SEEN_TIMEOUT = 20


@pytest.fixture
def callers(django_user_model, site_celery) -> dict[str, Client]:
    """One client per owner, and one for staff. Anonymous sessions start on their first POST."""
    alice = django_user_model.objects.create_user("alice", password="pw-alice-123")
    bob = django_user_model.objects.create_user("bob", password="pw-bob-123")
    carol = django_user_model.objects.create_user("carol", password="pw-carol-123")
    staff = django_user_model.objects.create_user("root", password="pw-root-123", is_staff=True)
    clients = {name: Client() for name in ("alice", "bob", "anonymous A", "anonymous B", "staff")}
    clients["alice"].force_login(alice)
    clients["bob"].force_login(bob)
    clients["staff"].force_login(staff)
    clients["token carol"] = Client(HTTP_AUTHORIZATION=f"Bearer {ApiToken.issue(carol, 'script')[1]}")
    return clients


@pytest.fixture
def jobs(callers, one_drawing) -> dict[str, Job]:
    """Each owner's job: the same drawing for all (so deduplication could leak, if it were global)."""
    made = {}
    for name in OWNERS:
        response = callers[name].post("/api/jobs", json.dumps({"model": "digits", "input": {"image": one_drawing}}),
                                      content_type="application/json")
        assert response.status_code == 202, response.json()
        made[name] = Job.objects.get(pk=response.json()["id"])
    assert len({job.owner_key for job in made.values()}) == len(OWNERS)
    return made


def nobody_answer(client: Client, method: str, tail: str) -> tuple[int, dict]:
    """What a job that does not exist answers (the id is replaced back for comparison)."""
    ghost = str(uuid.uuid4())
    response = client.generic(method, f"/api/jobs/{ghost}{tail}")
    return response.status_code, json.loads(response.content.decode().replace(ghost, "<id>"))


@pytest.mark.parametrize(("owner", "intruder"), PAIRS)
def test_another_owner_cannot_read_stream_fetch_or_list_a_job(callers, jobs, owner, intruder):
    job, client = jobs[owner], callers[intruder]
    for tail in ("", "/events", "/input"):
        response = client.get(f"/api/jobs/{job.id}{tail}")
        answer = json.loads(response.content.decode().replace(str(job.id), "<id>"))
        assert (response.status_code, answer) == nobody_answer(client, "GET", tail), (tail, answer)
        assert answer == {"error": "no job <id> among yours"}
    for query in ("", "?all=1", "?status=queued", f"?model={job.model}"):
        listed = [item["id"] for item in client.get(f"/api/jobs{query}").json()["jobs"]]
        assert str(job.id) not in listed and listed == [str(jobs[intruder].id)], query


def test_each_owner_reads_streams_fetches_and_lists_their_own_job(callers, jobs):
    """The control: the 404s above are about ownership, not a broken setup."""
    streams = []
    for name, job in jobs.items():
        client = callers[name]
        assert client.get(f"/api/jobs/{job.id}").json()["id"] == str(job.id)
        image = client.get(f"/api/jobs/{job.id}/input")
        assert image.status_code == 200 and b"".join(image.streaming_content).startswith(b"\x89PNG")
        events = client.get(f"/api/jobs/{job.id}/events")
        assert events.status_code == 200 and events["Content-Type"] == "text/event-stream"
        streams.append(events)
        assert [item["id"] for item in client.get("/api/jobs").json()["jobs"]] == [str(job.id)]
    for events in streams:  # last: closing one ends its request, which closes the database connection
        events.close()


def test_staff_read_list_and_cancel_any_job(callers, jobs, site_celery):
    staff = callers["staff"]
    assert {item["id"] for item in staff.get("/api/jobs?all=1").json()["jobs"]} == {str(j.id) for j in jobs.values()}
    assert staff.get("/api/jobs").json()["jobs"] == []  # without all=1, staff see their own, like anyone
    for job in jobs.values():
        assert staff.get(f"/api/jobs/{job.id}").status_code == 200
        assert staff.get(f"/api/jobs/{job.id}/input").status_code == 200
    victim = jobs["anonymous A"]
    assert staff.delete(f"/api/jobs/{victim.id}").status_code == 202
    victim.refresh_from_db()
    assert victim.cancel_requested_at is not None and site_celery.backend.is_cancelled(str(victim.id))


def test_a_refused_cancel_changes_nothing_and_sends_no_revoke(callers, jobs, site_celery, worker_factory,
                                                              etcd_server):
    worker = worker_factory(app="tests.celery_app", queues="isolation-idle",
                            env={"ETCD_TEST_URL": etcd_server.url, "ETCD_TEST_PREFIX": SITE_PREFIX})
    hostname = worker.hostname.replace("%h", socket.gethostname())
    finished = jobs["bob"]
    Job.objects.filter(pk=finished.pk).update(status=Status.SUCCEEDED)  # 409 for its owner, 404 for others
    for owner, intruder in PAIRS:
        response = callers[intruder].delete(f"/api/jobs/{jobs[owner].id}")
        assert (response.status_code, response.json()) == (404, {"error": f"no job {jobs[owner].id} among yours"})
    for name, job in jobs.items():
        fresh = Job.objects.get(pk=job.pk)
        assert fresh.cancel_requested_at is None, name
        assert fresh.status == (Status.SUCCEEDED if job == finished else Status.QUEUED), name
        assert not site_celery.backend.is_cancelled(str(job.id)), name
        assert site_celery.AsyncResult(str(job.id)).state == "PENDING", name

    # The control: a cancel that is allowed reaches the worker; anything broadcast before it would have too.
    control = callers["alice"].post("/api/jobs", json.dumps({"model": "text", "input": {"prompt": "control"}}),
                                    content_type="application/json").json()["id"]
    assert callers["alice"].delete(f"/api/jobs/{control}").status_code == 202
    revoked = wait_until(lambda: _revoked(site_celery, hostname, control), timeout=REVOKE_SEEN_TIMEOUT,
                         interval=0.5, message="the worker heard the control revoke")
    assert not revoked & {str(job.id) for job in jobs.values()}, revoked


def _revoked(app, hostname: str, expected: str) -> set[str] | None:
    replies = app.control.inspect(destination=[hostname], timeout=2).revoked() or {}
    revoked = set(replies.get(hostname) or [])
    return revoked if expected in revoked else None


def test_the_same_input_from_someone_else_gets_its_own_job(callers, jobs, one_drawing):
    """Deduplication is per owner: an identical request never hands back another owner's job."""
    response = callers["bob"].post("/api/jobs", json.dumps({"model": "digits", "input": {"image": one_drawing}}),
                                   content_type="application/json")
    assert (response.status_code, response.json()["id"]) == (200, str(jobs["bob"].id))
    newcomer = Client()
    response = newcomer.post("/api/jobs", json.dumps({"model": "digits", "input": {"image": one_drawing}}),
                             content_type="application/json")
    assert response.status_code == 202 and response.json()["id"] not in {str(j.id) for j in jobs.values()}


def test_stored_images_have_no_public_url(callers, jobs, settings):
    job = jobs["alice"]
    assert job.input_file and job.input_file.name.startswith("jobs/")
    for client in (callers["bob"], callers["alice"], Client()):
        assert client.get(f"{settings.MEDIA_URL}{job.input_file.name}").status_code == 404
