"""The JSON API: models, and the caller's jobs (submit, list, read, cancel).

Every view is small and never waits on a Celery result; live state comes from
``/api/jobs/<id>/events`` (jobs/api/events.py). Documented in docs/api.md.
"""
from __future__ import annotations

import logging
import mimetypes

from django.conf import settings
from django.core.paginator import InvalidPage, Paginator
from django.db import connection
from django.http import FileResponse, HttpRequest, JsonResponse

from jobs import services
from jobs.api.auth import api, client_address, get_job, owner_key, visible_jobs
from jobs.models import Status
from jobs.validation import RequestRefused, describe_models, parse_submission

logger = logging.getLogger(__name__)


@api("GET")
def model_list(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"models": describe_models()})


@api("GET", "POST")
def jobs(request: HttpRequest) -> JsonResponse:
    if request.method == "POST":
        return submit(request)
    return job_list(request)


def submit(request: HttpRequest) -> JsonResponse:
    submission = parse_submission(request)
    key = owner_key(request, create=True)
    job, created = services.submit(submission, owner_key=key, user=request.user,
                                   session_key=request.session.session_key or "",
                                   client_address=client_address(request))
    response = JsonResponse(job.to_dict(), status=202 if created else 200)
    response["Location"] = job.to_dict(position=False)["status_url"]
    return response


def job_list(request: HttpRequest) -> JsonResponse:
    queryset = visible_jobs(request, everyone=request.GET.get("all") == "1")
    if request.GET.get("status"):
        statuses = request.GET["status"].split(",")
        bad = sorted(set(statuses) - set(Status.values))
        if bad:
            raise RequestRefused(f"unknown status {bad}; use {', '.join(Status.values)}", field="status")
        queryset = queryset.filter(status__in=statuses)
    if request.GET.get("model"):
        queryset = queryset.filter(model=request.GET["model"])
    paginator = Paginator(queryset.order_by("-created_at"), settings.JOBS_PAGE_SIZE)
    try:
        page = paginator.page(request.GET.get("page") or 1)
    except InvalidPage:
        raise RequestRefused(f"page must be a number from 1 to {paginator.num_pages}", field="page") from None
    return JsonResponse({
        "jobs": [job.to_dict() for job in page.object_list],
        "count": paginator.count,
        "page": page.number,
        "pages": paginator.num_pages,
        "next": _page_url(request, page.next_page_number()) if page.has_next() else None,
        "previous": _page_url(request, page.previous_page_number()) if page.has_previous() else None,
    })


def _page_url(request: HttpRequest, number: int) -> str:
    query = request.GET.copy()
    query["page"] = str(number)
    return f"{request.path}?{query.urlencode()}"


@api("GET", "DELETE")
def job(request: HttpRequest, job_id: str) -> JsonResponse:
    found = get_job(request, job_id)
    if request.method == "DELETE":
        found = services.cancel(found)
        return JsonResponse(found.to_dict(), status=202)
    return JsonResponse(found.to_dict())


@api("GET")
def job_input(request: HttpRequest, job_id: str) -> FileResponse:
    """The image a job was submitted with (owner or staff only; never a public media URL)."""
    found = get_job(request, job_id)
    if not found.input_file:
        raise RequestRefused(f"job {found.id} has no input file", status=404)
    response = FileResponse(found.input_file.open("rb"), content_type=_image_type(found.input_file.name))
    response["Cache-Control"] = "private, max-age=3600"
    return response


def _image_type(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


@api("GET")
def health(request: HttpRequest) -> JsonResponse:
    """Liveness for load balancers and the flood test: the database answers a query and etcd a
    read under our prefix; 503 names what did not answer."""
    checks = {"database": _check_database(), "etcd": _check_etcd()}
    ok = all(value == "ok" for value in checks.values())
    return JsonResponse({"ok": ok, **checks}, status=200 if ok else 503)


def _check_database() -> str:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return "ok"
    except Exception as exc:  # noqa: BLE001 - any failure is the answer
        logger.warning("health: database did not answer: %s", exc)
        return f"unreachable: {type(exc).__name__}"


def _check_etcd() -> str:
    from etcd_broker.core.client import get_client
    from etcd_broker.core.ops import KeySpace, range_end

    try:
        queues = KeySpace(settings.ETCD_PREFIX).declared_queues()
        get_client(settings.ETCD_URL, **settings.ETCD_OPTIONS).get_range_response(
            queues, range_end(queues), count_only=True)
        return "ok"
    except Exception as exc:  # noqa: BLE001 - any failure is the answer
        logger.warning("health: etcd did not answer: %s", exc)
        return f"unreachable: {type(exc).__name__}"
