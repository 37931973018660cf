"""URL routes: admin, the JSON API (jobs) and the browser pages (frontend)."""
from __future__ import annotations

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("jobs.urls")),
    path("", include("frontend.urls")),
]
