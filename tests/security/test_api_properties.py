"""Property tests of the JSON API with Django's test client, the real etcd broker behind it.

Whatever arrives (any JSON, wrong types, huge strings, wrong Content-Types, malformed or
enormous images, junk ids and query strings), the answer is a JSON 4xx naming the problem, or
a 2xx for a request the model's own check accepts; never a 5xx. A Job row exists, and a task
waits in the broker's ``gpu`` queue, exactly for each 202.
"""
from __future__ import annotations

import json
import logging
import string
from dataclasses import dataclass, replace
from urllib.parse import quote, urlencode

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client
from django.utils.http import parse_header_parameters
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from PIL import Image, ImageDraw

from etcd_broker.stats import queue_stats, stats_for_connection
from jobs.models import Job, Status
from ml.errors import InvalidInput
from ml.images import MAX_DATA_URL_CHARS, MAX_IMAGE_PIXELS, image_to_data_url
from ml.registry import MODELS
from tests.security.bad_images import any_images, bombs, broken_images, data_url, encode
from tests.site.fixtures import *  # noqa: F403 - the site's fixtures: site_celery, user, make_job, ...
from tests.site.fixtures import GPU_QUEUE

logger = logging.getLogger(__name__)
pytestmark = pytest.mark.django_db

#: Examples per property: each is one or two requests; the file stays well under a minute.
EXAMPLES = 60
PROPERTY = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
IMAGE_MODELS = ("digits", "fashion")
#: Content-Types the API reads; every other one must get 415.
ACCEPTED_TYPES = ("application/json", "multipart/form-data")

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=15,
)
model_names = st.sampled_from(sorted(MODELS))
prompts = st.text(alphabet=string.ascii_letters + " ", min_size=1, max_size=40)


@st.composite
def inputs_for(draw, model: str) -> dict:
    """An input object in the model's vocabulary (often valid for text, rarely for images)."""
    if model == "text":
        return draw(st.fixed_dictionaries({"prompt": prompts}, optional={
            "length": st.integers(-5, 1200) | json_values, "temperature": st.floats(-1, 3) | json_values,
            "mode": st.sampled_from(["generate", "suggest", "poem"]), "seed": st.integers(-1, 2**32)}))
    image = st.builds(data_url, any_images()) | json_values
    return draw(st.fixed_dictionaries({}, optional={"image": image, "pixels": json_values, "width": json_values}))


def strict_json(value) -> bool:
    """True when ``value`` is JSON by the standard (no NaN or Infinity, which the API refuses)."""
    try:
        json.dumps(value, allow_nan=False)
        return True
    except ValueError:
        return False


def is_model(value) -> bool:
    return isinstance(value, str) and value in MODELS


@st.composite
def submissions(draw) -> dict:
    """A body shaped like a submission, with any of its parts wrong (or none)."""
    model = draw(model_names | json_values)
    body = {"model": model} if draw(st.booleans()) or is_model(model) else {}
    body["input"] = draw(inputs_for(model) if is_model(model) else json_values)
    if draw(st.booleans()):
        body["priority"] = draw(st.integers(-3, 12) | json_values)
    if draw(st.integers(0, 9)) == 0:
        body[draw(st.text(max_size=8))] = draw(json_values)
    return body


@dataclass(frozen=True)
class Seen:
    jobs: int
    waiting: int


@pytest.fixture
def api(settings, site_celery, monkeypatch):
    """Every model available (the training data need not be installed to validate), caps out of the
    way (the flood test checks them), and a view of the Job table and the ``gpu`` queue in etcd."""
    for name, spec in MODELS.items():
        monkeypatch.setitem(MODELS, name, replace(spec, data_check=lambda: (True, "")))
    settings.JOBS_MAX_QUEUED_PER_ADDRESS = 10**6
    with site_celery.connection_for_read() as connection:
        connection.ensure_connection(max_retries=1)
        client, keys = stats_for_connection(connection)

        def seen() -> Seen:
            rows = {row["queue"]: row["ready"] for row in queue_stats(client, keys)}
            return Seen(Job.objects.count(), rows.get(GPU_QUEUE, 0))

        yield seen


def post(body, content_type: str = "application/json", client: Client | None = None, **extra):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return (client or Client()).generic("POST", "/api/jobs", data, content_type=content_type, **extra)


def assert_answered(response, before: Seen, after: Seen) -> dict:
    """No 5xx; a 4xx is JSON with an error; a job and a queued task exactly for a 202."""
    status = response.status_code
    if currently_in_test_context():  # pytest --hypothesis-show-statistics: how often each answer came
        event(f"status {status}")
    assert status < 500, (status, response.content[:500])
    body = response.json() if response["Content-Type"] == "application/json" else None
    if status in (200, 202):
        assert Job.objects.filter(pk=body["id"]).exists()
        created = 1 if status == 202 else 0
    else:
        assert 400 <= status < 500, status
        assert body is not None, (status, response["Content-Type"], response.content[:300])
        assert isinstance(body.get("error"), str) and body["error"].strip(), body
        created = 0
    assert (after.jobs - before.jobs, after.waiting - before.waiting) == (created, created), (status, body)
    return body


def assert_read(response, before: Seen, after: Seen) -> None:
    """A read (or a refused write) answers without a 5xx, in JSON when it refuses, and changes nothing."""
    status = response.status_code
    assert status < 500, (status, response.content[:500])
    if status >= 400:
        assert response["Content-Type"] == "application/json", (status, response.content[:300])
        assert response.json()["error"].strip()
    assert after == before


def accepted_by_the_model(model: str, payload) -> bool:
    try:
        MODELS[model].validate(payload)
        return True
    except InvalidInput:
        return False


@PROPERTY
@given(body=submissions() | json_values, extra_text=st.none() | st.binary(max_size=50))
def test_any_json_body_is_answered_and_queued_only_when_accepted(api, body, extra_text):
    before = api()
    raw = json.dumps(body).encode() + (extra_text or b"")  # NaN and Infinity included, trailing junk
    response = post(raw)
    answer = assert_answered(response, before, api())
    if response.status_code in (200, 202):
        assert accepted_by_the_model(body["model"], body.get("input", {}))
        assert answer["status"] == Status.QUEUED


@PROPERTY
@given(model=json_values | st.text(max_size=30))
def test_a_model_that_is_not_a_model_name_is_refused_on_model(api, model):
    assume(not is_model(model) and strict_json(model))
    before = api()
    response = post({"model": model, "input": {"prompt": "To be"}})
    assert_answered(response, before, api())
    assert (response.status_code, response.json()["field"]) == (400, "model")


def acceptable_priority(value) -> bool:
    """What a non-staff caller may send as priority (the reference, written from docs/api.md)."""
    if value is None or value == "":
        return True
    if isinstance(value, bool) or not isinstance(value, int | str):
        return False
    return str(value).strip() in {str(p) for p in range(6)}


@PROPERTY
@given(priority=json_values | st.integers() | st.floats() | st.text(max_size=6), prompt=prompts)
def test_a_priority_that_is_not_a_whole_number_from_0_to_5_is_refused_on_priority(api, priority, prompt):
    assume(not acceptable_priority(priority) and strict_json(priority))
    before = api()
    response = post({"model": "text", "input": {"prompt": prompt}, "priority": priority})
    assert_answered(response, before, api())
    assert (response.status_code, response.json()["field"]) == (400, "priority")


@PROPERTY
@given(where=st.sampled_from(["prompt", "model", "image", "unknown field", "after the object"]),
       over=st.integers(1, 64 * 1024), multipart=st.booleans())
def test_a_body_over_the_limit_is_refused_with_413(api, settings, where, over, multipart):
    limit = settings.JOBS_MAX_REQUEST_BYTES
    huge = "x" * (limit + over)
    body = {"model": "text", "input": {"prompt": "hi"}}
    if where == "prompt":
        body["input"]["prompt"] = huge
    elif where == "model":
        body["model"] = huge
    elif where == "image":
        body = {"model": "digits", "input": {"image": "data:image/png;base64," + huge}}
    elif where == "unknown field":
        body[huge[:100]] = huge
    before = api()
    if multipart:
        fields = {key: value if isinstance(value, str) else json.dumps(value) for key, value in body.items()}
        if where == "after the object":
            fields["padding"] = huge
        response = Client().post("/api/jobs", fields)
    else:
        raw = json.dumps(body) + (" " * (limit + over) if where == "after the object" else "")
        response = post(raw)
    assert_answered(response, before, api())
    assert response.status_code == 413 and str(limit) in response.json()["error"]


@pytest.mark.parametrize(("field", "value", "limit"), [
    ("input.prompt", {"model": "text", "input": {"prompt": "a" * 100_000}}, "500"),
    ("input.image", {"model": "fashion", "input": {"image": "data:image/png;base64," + "A" * MAX_DATA_URL_CHARS}},
     f"{MAX_DATA_URL_CHARS:,}"),
])
def test_a_huge_string_under_the_body_limit_is_refused_naming_its_own_limit(api, field, value, limit):
    before = api()
    response = post(value)
    assert_answered(response, before, api())
    assert response.status_code == 400 and response.json()["field"] == field
    assert limit in response.json()["error"]


content_types = st.sampled_from([
    "text/plain", "application/xml", "text/xml", "application/x-www-form-urlencoded", "", "image/png",
    "application/javascript", "multipart/mixed", "application/json-patch+json", "text/json",
]) | st.builds(lambda a, b: f"{a}/{b}", st.text(string.ascii_lowercase, min_size=1, max_size=10),
               st.text(string.ascii_lowercase + "+-.", min_size=1, max_size=10))


@PROPERTY
@given(content_type=content_types, prompt=prompts)
def test_a_content_type_other_than_json_or_multipart_is_refused_with_415(api, content_type, prompt):
    assume(parse_header_parameters(content_type)[0] not in ACCEPTED_TYPES)
    before = api()
    response = post(json.dumps({"model": "text", "input": {"prompt": prompt}}), content_type=content_type)
    assert_answered(response, before, api())
    assert response.status_code == 415 and "application/json" in response.json()["error"]


@PROPERTY
@given(fields=st.dictionaries(st.sampled_from(["model", "input", "priority", "csrfmiddlewaretoken", "other"]),
                              st.text(max_size=40) | json_values.map(json.dumps), max_size=4))
def test_multipart_without_a_file_is_checked_like_json(api, fields):
    before = api()
    response = Client().post("/api/jobs", fields)
    assert_answered(response, before, api())
    if response.status_code in (200, 202):
        assert accepted_by_the_model(fields["model"], json.loads(fields.get("input") or "{}"))


@PROPERTY
@given(raw=st.binary(max_size=300), boundary=st.none() | st.text(string.ascii_letters + "-'=", max_size=20))
def test_a_malformed_multipart_body_is_refused_in_json(api, raw, boundary):
    content_type = "multipart/form-data" + (f"; boundary={boundary}" if boundary is not None else "")
    before = api()
    response = post(raw, content_type=content_type)
    assert_answered(response, before, api())


@pytest.mark.parametrize("shape", ["deeply nested body", "deeply nested input", "huge integer", "Infinity",
                                   "1e400 priority", "NaN in input"])
def test_json_python_reads_but_cannot_use_is_refused_with_400(api, shape):
    bodies = {
        "deeply nested body": "[" * 100_000 + "]" * 100_000,
        "deeply nested input": '{"model": "text", "input": ' + "[" * 100_000 + "]" * 100_000 + "}",
        "huge integer": '{"model": "text", "input": {"prompt": "hi"}, "priority": ' + "9" * 5000 + "}",
        "Infinity": '{"model": "text", "input": {"prompt": "hi"}, "priority": Infinity}',
        "1e400 priority": '{"model": "text", "input": {"prompt": "hi"}, "priority": 1e400}',
        "NaN in input": '{"model": "text", "input": {"prompt": "hi", "temperature": NaN}}',
    }
    before = api()
    response = post(bodies[shape])
    assert_answered(response, before, api())
    assert response.status_code == 400


def multipart(parts: list[tuple[str, bytes, str | None]], boundary: str = "b0undary") -> bytes:
    """A multipart body by hand: (field name, value, file name or None)."""
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


@pytest.mark.parametrize(("shape", "content_type", "body"), [
    ("no boundary", "multipart/form-data", b"model=text"),
    ("1,100 fields", "multipart/form-data; boundary=b0undary",
     multipart([(f"f{i}", b"x", None) for i in range(1100)])),
    ("120 files", "multipart/form-data; boundary=b0undary",
     multipart([(f"f{i}", b"x", f"{i}.png") for i in range(120)])),
])
@pytest.mark.parametrize("with_session", [False, True])
def test_a_multipart_body_django_cannot_parse_gets_a_json_400(api, shape, content_type, body, with_session):
    """Django raises these wherever request.POST is first read: in our view, or in the CSRF check
    of a browser session (which reads csrfmiddlewaretoken from the body)."""
    client = Client(enforce_csrf_checks=with_session)
    if with_session:
        client.get("/")  # the csrftoken cookie, as a page gives it
        client.post("/api/jobs", {"model": "text", "input": json.dumps({"prompt": "first"}),
                                  "csrfmiddlewaretoken": client.cookies["csrftoken"].value})
        assert "sessionid" in client.cookies
    before = api()
    response = post(body, content_type=content_type, client=client,
                    HTTP_X_CSRFTOKEN=client.cookies["csrftoken"].value if with_session else "")
    assert_answered(response, before, api())
    assert response.status_code == 400 and "request body cannot be read" in response.json()["error"], shape


@pytest.mark.parametrize("how", ["data URL", "upload"])
@PROPERTY
@given(model=st.sampled_from(IMAGE_MODELS), raw=broken_images())
def test_a_malformed_image_is_refused_on_the_image_field(api, how, model, raw):
    before = api()
    if how == "upload":
        response = Client().post("/api/jobs", {"model": model, "image": SimpleUploadedFile("a.png", raw, "image/png")})
    else:
        response = post({"model": model, "input": {"image": data_url(raw)}})
    assert_answered(response, before, api())
    assert (response.status_code, response.json()["field"]) == (400, "input.image")


@PROPERTY
@given(model=st.sampled_from(IMAGE_MODELS), raw=any_images(), name=st.text(string.ascii_letters + "._-", max_size=20),
       declared=st.sampled_from(["image/png", "text/html", "application/octet-stream"]))
def test_an_uploaded_image_is_queued_exactly_when_the_models_check_takes_it(api, model, raw, name, declared):
    before = api()
    upload = SimpleUploadedFile(name.strip(".") or "x", raw, declared)
    response = Client().post("/api/jobs", {"model": model, "image": upload})
    answer = assert_answered(response, before, api())
    try:
        checked = accepted_by_the_model(model, {"image": image_to_data_url(raw)})
    except InvalidInput:
        checked = False
    if response.status_code == 202:
        assert checked, "the site queued an image the model's own check refuses"
    else:
        assert (response.status_code, answer["field"]) == (400, "input.image")
        # refused although the model takes it: only for what the reduced grid lost, and it says so
        assert not checked or "once reduced" in answer["error"], answer


@pytest.mark.parametrize("bomb", sorted(bombs()))
@pytest.mark.parametrize("how", ["data URL", "upload"])
def test_a_decompression_bomb_is_refused_naming_the_pixel_limit(api, bomb, how):
    raw = bombs()[bomb]
    before = api()
    if how == "upload":
        response = Client().post("/api/jobs", {"model": "fashion", "image": SimpleUploadedFile("b.png", raw)})
    else:
        response = post({"model": "fashion", "input": {"image": data_url(raw)}})
    assert_answered(response, before, api())
    assert response.status_code == 400 and f"{MAX_IMAGE_PIXELS:,}" in response.json()["error"]


def test_an_upload_over_the_body_limit_is_refused_with_413(api, settings):
    raw = b"\xff\xd8\xff\xe0" + bytes(settings.JOBS_MAX_REQUEST_BYTES)
    before = api()
    response = Client().post("/api/jobs", {"model": "fashion", "image": SimpleUploadedFile("big.jpg", raw)})
    assert_answered(response, before, api())
    assert response.status_code == 413


ids = st.text(alphabet=st.characters(blacklist_characters="/", blacklist_categories=("Cs",)), min_size=1,
              max_size=60) | st.uuids().map(str)
queries = st.dictionaries(st.sampled_from(["page", "status", "model", "all", "x"]),
                          st.text(max_size=12) | st.integers().map(str), max_size=4)


@PROPERTY
@given(method=st.sampled_from(["GET", "DELETE", "PUT", "PATCH", "POST"]), job_id=ids,
       tail=st.sampled_from(["", "/events", "/input"]), query=queries)
def test_junk_ids_and_methods_get_a_json_4xx(api, user, method, job_id, tail, query):
    client = Client()
    client.force_login(user)
    path = f"/api/jobs/{quote(job_id, safe='')}{tail}"
    before = api()
    response = client.generic(method, f"{path}?{urlencode(query)}")
    assert_read(response, before, api())
    assert response.status_code in (404, 405)


@PROPERTY
@given(query=queries, last_event_id=st.none() | st.text(max_size=30) | st.integers().map(str))
def test_junk_query_strings_and_event_ids_never_break_a_read(api, user, make_job, query, last_event_id):
    client = Client()
    client.force_login(user)
    done = make_job(user, status=Status.SUCCEEDED, result={"text": "x"})
    before = api()
    listing = client.get(f"/api/jobs?{urlencode(query)}")
    assert_read(listing, before, api())
    assert listing.status_code in (200, 400)
    headers = {"HTTP_LAST_EVENT_ID": last_event_id} if last_event_id is not None else {}
    events = client.get(f"/api/jobs/{done.id}/events", **headers)
    assert events.status_code == 200
    assert b"succeeded" in b"".join(events.streaming_content)


@pytest.mark.parametrize("last_event_id", ["-5", str(2**64), "abc", "1e3"])
def test_a_bogus_last_event_id_still_gets_the_current_state(api, user, make_job, site_celery, last_event_id):
    job = make_job(user)
    site_celery.backend.store_result(str(job.id), {"pid": 1, "hostname": "w@box"}, "STARTED")
    client = Client()
    client.force_login(user)
    response = client.get(f"/api/jobs/{job.id}/events", HTTP_LAST_EVENT_ID=last_event_id)
    assert response.status_code == 200
    chunks = iter(response.streaming_content)
    try:
        first = [next(chunks, b"") for _ in range(3)]  # retry, position, then the state
    finally:
        response.close()
    states = [chunk for chunk in first if b"event: state" in chunk]
    assert states and b'"status":"running"' in states[0], first


def drawn(size: tuple[int, int], line: list[tuple[int, int]], width: int) -> str:
    image = Image.new("L", size, 255)
    ImageDraw.Draw(image).line(line, fill=0, width=width)
    return data_url(encode(image, "PNG"))


@pytest.mark.parametrize("model", IMAGE_MODELS)
def test_an_image_under_8_pixels_a_side_is_refused_like_a_pixel_grid(api, model):
    before = api()
    response = post({"model": model, "input": {"image": drawn((4, 30), [(1, 1), (2, 28)], 1)}})
    assert_answered(response, before, api())
    assert response.json() == {"error": "input.image: image is 4x30; each side must be at least 8 pixels",
                               "field": "input.image"}


def test_a_long_thin_image_is_queued_not_refused_for_its_reduced_size(api):
    before = api()
    response = post({"model": "digits", "input": {"image": drawn((600, 10), [(100, 2), (500, 8)], 3)}})
    assert_answered(response, before, api())
    assert response.status_code == 202


def test_a_refusal_of_the_reduced_grid_names_the_field_the_client_sent(api):
    """A one-pixel line on a 512 canvas fades below the ink threshold once reduced to 64x64."""
    url = drawn((512, 512), [(100, 50), (100, 450)], 1)
    assert accepted_by_the_model("digits", {"image": url})
    before = api()
    response = post({"model": "digits", "input": {"image": url}})
    assert_answered(response, before, api())
    assert response.json()["field"] == "input.image"
    assert response.json()["error"].endswith("(once reduced to the 64x64 grid the model is sent)")
