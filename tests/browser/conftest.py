"""A real headless Chromium (Debian's, driven by Playwright) against the live site, with
the parts a newcomer's ``make run`` has: etcd, ``watch_jobs`` (a thread here, sharing the
test database) and, for end-to-end tests, a real model worker serving tiny trained models."""
from __future__ import annotations

import os
import shutil
import threading

import pytest

from tests.site.conftest import pytest_configure  # noqa: F401 - same warning filters
from tests.site.fixtures import *  # noqa: F403 - users, jobs, the Celery app on the test etcd

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


@pytest.fixture(scope="session")
def chromium():
    if not os.path.exists(CHROMIUM) and not shutil.which("chromium"):
        pytest.skip("Debian chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API keeps an event loop in the test thread from here on; Django refuses
    # ORM calls from a thread with a running loop unless told they are deliberate (they are).
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            yield browser
            browser.close()
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


@pytest.fixture
def page(chromium, live_server):
    context = chromium.new_context(viewport={"width": 1280, "height": 900}, base_url=live_server.url)
    context.set_default_timeout(30_000)
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    context.close()
    assert errors == [], f"JavaScript errors: {errors}"


@pytest.fixture
def job_watcher(live_server, site_celery):
    """watch_jobs following task states on the test etcd, in a thread sharing the test database."""
    from jobs.management.commands.watch_jobs import JobWatcher

    stop = threading.Event()
    watcher = JobWatcher(site_celery)
    thread = threading.Thread(target=watcher.run, args=(stop,), name="watch_jobs", daemon=True)
    thread.start()
    yield watcher
    stop.set()
    thread.join(timeout=10)


@pytest.fixture
def site(live_server, job_watcher, settings, tiny_models):
    """The live site on the test etcd serving the tiny models, with watch_jobs running."""
    settings.MODEL_DIR = tiny_models
    return live_server


@pytest.fixture
def model_worker(site, start_model_worker):
    """A real model worker, started once the live site runs."""
    return start_model_worker()
