"""A newcomer's first minute in a real Chromium: the digits model is not trained yet, its
training job (deliberately tiny: a few epochs) runs on a real worker through the queue, the
home and model pages show its live progress, then switch to the model without a reload; the
model page then shows the model card, accepts a drawing and answers it."""
from __future__ import annotations

import re
import subprocess

import pytest
from playwright.sync_api import expect

from jobs.models import Job, Status
from tests.browser.test_pages_in_chromium import JOB_TIMEOUT_MS, draw_seven, snap
from tests.site.fixtures import SITE_PREFIX, WORKER_THREADS

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

#: Epochs of the tiny training run (the 1,437 digits: about a second each on 2 busy cores).
TINY_EPOCHS = 5
#: Milliseconds for the worker to start (TensorFlow import) and train the tiny model.
TRAINING_TIMEOUT_MS = 180_000
#: Records every text the training job's line shows, however briefly (progress can be fast).
RECORD_LINES = """() => {
  window.trainingLines = [];
  const record = () => document.querySelectorAll(".job-line").forEach((n) => window.trainingLines.push(n.textContent));
  new MutationObserver(record).observe(document.body, { childList: true, subtree: true, characterData: true });
  record();
}"""


@pytest.fixture
def empty_models(settings, tmp_path):
    settings.MODEL_DIR = tmp_path / "models"
    settings.MODEL_DIR.mkdir()
    return settings.MODEL_DIR


@pytest.fixture
def untrained_worker(etcd_server, empty_models, tmp_path):
    """Starts a real model worker whose MODEL_DIR is the empty one (as `make run`'s, first time)."""
    from tests.helpers import WorkerProcess

    started = []

    def start() -> WorkerProcess:
        env = {"ETCD_URL": etcd_server.url, "CELERY_BROKER_URL": etcd_server.url,
               "CELERY_RESULT_BACKEND": etcd_server.url, "ETCD_PREFIX": SITE_PREFIX,
               "MODEL_DIR": str(empty_models), "TF_CPP_MIN_LOG_LEVEL": "2"}
        worker = WorkerProcess(app="deephardway_site", env=env, queues="gpu", concurrency=WORKER_THREADS,
                               log_dir=tmp_path, extra_args=["--without-heartbeat"]).start(wait=False)
        started.append(worker)
        return worker

    yield start
    for worker in started:
        try:
            worker.terminate(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()


def test_watch_a_model_train_then_use_it(page, live_server, job_watcher, empty_models, untrained_worker):
    from jobs.training import submit_training

    training, created = submit_training("digits", TINY_EPOCHS)  # what `make run` does for a missing model
    assert created

    home = page.context.new_page()
    home.goto("/")
    home_card = home.locator('.model-card[data-model="digits"]')
    expect(home_card).to_have_attribute("data-state", "training")
    expect(home_card.locator(".job-line")).to_have_text(re.compile(r"Next in line|Waiting for a worker"))
    snap(home, "home-training")

    page.goto("/models/digits/")
    page.evaluate(RECORD_LINES)
    expect(page.locator("#training")).to_be_visible()
    expect(page.locator("#training .job-title")).to_have_text("Training: Handwritten digit")
    expect(page.locator("#submit")).to_be_disabled()
    snap(page, "training-queued")

    untrained_worker()
    expect(page.locator("#training .job")).to_have_attribute("data-status", "running", timeout=TRAINING_TIMEOUT_MS)
    snap(page, "training-running")
    expect(page.locator("#submit")).to_be_enabled(timeout=TRAINING_TIMEOUT_MS)  # switched, no reload

    lines = page.evaluate("window.trainingLines")
    progress = re.compile(rf"epoch (\d) of {TINY_EPOCHS} · .*loss \d\.\d{{4}}.* · about \d+ s left")
    epochs_seen = {int(m.group(1)) for line in lines if (m := progress.search(line))}
    assert epochs_seen, f"no training progress was shown; lines seen: {sorted(set(lines))}"
    expect(page.locator("#training")).to_be_hidden()
    card = page.locator("#model-card")
    expect(card).to_be_visible()
    expect(card).to_contain_text("test accuracy")
    expect(card).to_contain_text(f"({TINY_EPOCHS} epochs)")
    expect(card).to_contain_text("scikit-learn load_digits")
    snap(page, "trained")

    expect(home_card).to_have_attribute("data-state", "ready")
    expect(home_card.locator(".card-cta")).to_have_text("Try it →")

    draw_seven(page)
    page.click("#submit")
    answer = page.locator("#current-job .job")
    expect(answer).to_have_attribute("data-status", "succeeded", timeout=JOB_TIMEOUT_MS)
    expect(answer.locator(".bars li")).to_have_count(5)
    snap(page, "first-answer")

    page.goto("/jobs/")  # My jobs lists the training job too, with the model card it produced
    listed = page.locator(f'.job[data-job="{training.id}"]')
    expect(listed).to_have_attribute("data-status", "succeeded")
    expect(listed.locator(".facts")).to_contain_text("test accuracy")
    expect(listed.locator("[data-action=cancel]")).to_have_count(0)

    training.refresh_from_db()
    assert (training.status, training.result["epochs"]) == (Status.SUCCEEDED, TINY_EPOCHS)
    assert (empty_models / "digits.keras").is_file()
    assert Job.objects.filter(model="digits", status=Status.SUCCEEDED).count() == 2
