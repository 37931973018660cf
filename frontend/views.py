"""Browser pages: the model list, one page per model, and "My jobs".

Pages render a shell; the live parts (submitting, progress, results) are plain JS in
frontend/static/frontend/ talking to the JSON API and its event streams.
"""
from __future__ import annotations

import logging

from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.csrf import ensure_csrf_cookie

from jobs.validation import describe_models, models

logger = logging.getLogger(__name__)

#: Page widgets that exist (frontend/templates/frontend/widgets/<name>.html); others get JSON input.
WIDGETS = ("digits", "text", "fashion")


def _catalog() -> list[dict]:
    return describe_models()


@ensure_csrf_cookie
def home(request: HttpRequest) -> HttpResponse:
    return render(request, "frontend/home.html", {"models": _catalog(), "nav": "home"})


@ensure_csrf_cookie
def model_page(request: HttpRequest, name: str) -> HttpResponse:
    if name not in models():
        raise Http404(f"no model {name!r}")
    catalog = _catalog()
    model = next(m for m in catalog if m["name"] == name)
    widget = f"frontend/widgets/{name if name in WIDGETS else 'generic'}.html"
    return render(request, "frontend/model.html",
                  {"model": model, "widget": widget, "models": catalog, "nav": name})


@ensure_csrf_cookie
def my_jobs(request: HttpRequest) -> HttpResponse:
    return render(request, "frontend/jobs.html", {"models": _catalog(), "nav": "jobs"})
