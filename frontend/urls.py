"""Browser page routes."""
from __future__ import annotations

from django.urls import path

from frontend import views

app_name = "frontend"

urlpatterns = [
    path("", views.home, name="home"),
    path("models/<str:name>/", views.model_page, name="model"),
    path("jobs/", views.my_jobs, name="jobs"),
]
