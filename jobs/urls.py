"""JSON API routes (docs/api.md)."""
from __future__ import annotations

from django.urls import path

from jobs.api import events, views

app_name = "jobs"

urlpatterns = [
    path("healthz", views.health, name="health"),
    path("api/models", views.model_list, name="models"),
    path("api/jobs", views.jobs, name="jobs"),
    path("api/jobs/<str:job_id>", views.job, name="job"),
    path("api/jobs/<str:job_id>/events", events.job_events, name="job-events"),
    path("api/jobs/<str:job_id>/input", views.job_input, name="job-input"),
]
