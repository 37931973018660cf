"""The browser pages: no models, templates and static assets only."""
from __future__ import annotations

from django.apps import AppConfig


class FrontendConfig(AppConfig):
    name = "frontend"
