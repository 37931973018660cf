"""The site's fixtures (tests/site/fixtures.py, shared with tests/browser)."""
from __future__ import annotations

from tests.site.fixtures import *  # noqa: F403


def pytest_configure(config):
    # whitenoise warns that STATIC_ROOT (var/static) is absent until collectstatic runs.
    config.addinivalue_line("filterwarnings", "ignore:No directory at:UserWarning")
