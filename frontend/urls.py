"""Browser page routes."""
from __future__ import annotations

urlpatterns: list = []
