"""Who is calling the JSON API, and the ``@api`` decorator every API view wears.

Callers are a Django user (session cookie or ``Authorization: Bearer dhw_...`` token) or
an anonymous browser session, created on its first POST. CSRF is enforced whenever the
request rides on a session cookie, as Django forms are; token and cookie-less calls skip it.
"""
from __future__ import annotations

import ipaddress
import logging
import uuid
from collections.abc import Callable
from functools import wraps
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.http.multipartparser import MultiPartParserError
from django.middleware.csrf import CsrfViewMiddleware
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from jobs.models import TRAINING_OWNER, ApiToken, Job, owner_key_for
from jobs.validation import RequestRefused

logger = logging.getLogger(__name__)

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
#: Django's refusals of a body it cannot parse (raised wherever request.POST is first read).
UNREADABLE_BODY = (MultiPartParserError, TooManyFieldsSent, TooManyFilesSent, RequestDataTooBig)
#: An owner key that matches no job (a caller with neither user nor session).
NOBODY = "nobody:"


def authenticate_token(request: HttpRequest) -> bool:
    """Replace ``request.user`` with the bearer token's user; True if a token was used."""
    header = request.META.get("HTTP_AUTHORIZATION", "")
    if not header:
        return False
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise RequestRefused("Authorization must be 'Bearer <token>'", status=401)
    token = ApiToken.objects.select_related("user").filter(key_hash=ApiToken.hash(key.strip())).first()
    if token is None or not token.user.is_active:
        raise RequestRefused("API token is not valid", status=401)
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=timezone.now())
    request.user = token.user
    return True


def check_csrf(request: HttpRequest) -> None:
    """Django's CSRF check, for unsafe requests that carry a session cookie."""
    if request.method in SAFE_METHODS or settings.SESSION_COOKIE_NAME not in request.COOKIES:
        return
    refused = CsrfViewMiddleware(lambda r: HttpResponse()).process_view(request, None, (), {})
    if refused is not None:
        raise RequestRefused("CSRF check failed: send the csrftoken cookie's value in an X-CSRFToken "
                             "header, or use an API token", status=403)


def owner_key(request: HttpRequest, *, create: bool = False) -> str:
    """The caller's owner key; ``create`` starts an anonymous session if there is none."""
    if request.user.is_authenticated:
        return owner_key_for(request.user)
    session = getattr(request, "session", None)
    if session is None:
        return NOBODY
    if session.session_key is None and create:
        session.save()
    return owner_key_for(session_key=session.session_key) if session.session_key else NOBODY


def client_address(request: HttpRequest) -> str | None:
    """The caller's IP: REMOTE_ADDR, or the last hop of JOBS_CLIENT_ADDRESS_HEADER (set it to
    e.g. HTTP_X_FORWARDED_FOR behind a proxy; the last hop is the one the proxy added)."""
    header = settings.JOBS_CLIENT_ADDRESS_HEADER
    raw = request.META.get(header, "") if header else ""
    address = raw.split(",")[-1].strip() if raw else request.META.get("REMOTE_ADDR", "")
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return None


def visible_jobs(request: HttpRequest, *, everyone: bool = False):
    """Jobs the caller may see: their own and the models' training jobs; every job for staff
    (when ``everyone``)."""
    if everyone and request.user.is_staff:
        return Job.objects.all()
    return Job.objects.filter(owner_key__in=(owner_key(request), TRAINING_OWNER))


def get_job(request: HttpRequest, job_id: Any) -> Job:
    """The job, if the caller owns it or is staff; 404 otherwise (existence is not leaked).
    Training jobs are everyone's to read (model pages show them); only staff cancel them."""
    try:
        job = Job.objects.filter(pk=uuid.UUID(str(job_id))).first()
    except ValueError:
        job = None
    if job is not None and job.is_training and not request.user.is_staff and request.method not in SAFE_METHODS:
        raise RequestRefused(f"job {job_id} trains the {job.model} model; only staff may cancel it", status=403)
    if job is None or not (request.user.is_staff or job.is_training or job.owner_key == owner_key(request)):
        raise RequestRefused(f"no job {job_id} among yours", status=404)
    return job


def unreadable_body(exc: Exception) -> RequestRefused:
    """A body Django could not parse, as our JSON error (Django alone would answer an HTML 400)."""
    if isinstance(exc, RequestDataTooBig):
        limit = settings.JOBS_MAX_REQUEST_BYTES
        return RequestRefused(f"request body is over the limit of {limit} bytes", status=413)
    logger.warning("unreadable request body: %s", exc)
    return RequestRefused(f"request body cannot be read: {exc}")


def api(*methods: str) -> Callable:
    """Allowed methods, token auth, CSRF for cookie sessions, JSON errors."""

    def decorator(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @csrf_exempt
        @wraps(view)
        def wrapper(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            if request.method not in methods:
                response = JsonResponse({"error": f"method {request.method} not allowed; use "
                                                  f"{', '.join(methods)}"}, status=405)
                response["Allow"] = ", ".join(methods)
                return response
            try:
                if not authenticate_token(request):
                    check_csrf(request)
                return view(request, *args, **kwargs)
            except UNREADABLE_BODY as exc:
                refused = unreadable_body(exc)
                return JsonResponse(refused.to_dict(), status=refused.status)
            except RequestRefused as exc:
                return JsonResponse(exc.to_dict(), status=exc.status, headers=exc.headers)

        return wrapper

    return decorator
