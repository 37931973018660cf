"""What a visitor does in a real Chromium: draw a digit and get its answer, watch text stream
in, see a clear message for bad input, see their place in line, cancel a waiting job."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from playwright.sync_api import expect

from jobs.models import Job, Status

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

#: Seconds a job gets to finish end to end (worker start-up is not included: the fixture waits).
JOB_TIMEOUT_MS = 60_000
#: Set SCREENSHOTS=<dir> to keep a PNG of each page the tests reach.
SCREENSHOTS = os.environ.get("SCREENSHOTS")


def snap(page, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / f"{name}.png"), full_page=True)


def draw_seven(page) -> None:
    """Drag the mouse over the pad like a hand drawing a 7."""
    box = page.locator("#pad").bounding_box()
    x, y, w, h = box["x"], box["y"], box["width"], box["height"]
    page.mouse.move(x + 0.25 * w, y + 0.2 * h)
    page.mouse.down()
    page.mouse.move(x + 0.75 * w, y + 0.2 * h, steps=12)
    page.mouse.move(x + 0.42 * w, y + 0.85 * h, steps=16)
    page.mouse.up()


#: Digits drawn with the mouse on the pad: strokes of (x, y) points as fractions of the pad.
#: The 7 is draw_seven's, the one issue 23 saw answered "3".
MOUSE_DIGITS = {
    "7": [[(0.25, 0.2), (0.75, 0.2), (0.42, 0.85)]],
    "1": [[(0.5, 0.15), (0.48, 0.85)]],
    "4": [[(0.58, 0.15), (0.25, 0.62), (0.75, 0.62)], [(0.6, 0.35), (0.6, 0.88)]],
    "0": [[(0.5 + 0.2 * np.sin(t), 0.5 - 0.33 * np.cos(t)) for t in np.linspace(0, 2 * np.pi, 25)]],
    "3": [[(0.5 + 0.17 * np.cos(t), 0.32 + 0.16 * np.sin(t)) for t in np.linspace(-2.6, 1.57, 12)]
          + [(0.5 + 0.2 * np.cos(t), 0.66 + 0.18 * np.sin(t)) for t in np.linspace(-1.57, 2.6, 12)]],
}


def draw_strokes(page, strokes: list[list[tuple[float, float]]]) -> None:
    """Drag the mouse along each stroke on the pad, pressing the button for each."""
    box = page.locator("#pad").bounding_box()
    for stroke in strokes:
        points = [(box["x"] + x * box["width"], box["y"] + y * box["height"]) for x, y in stroke]
        page.mouse.move(*points[0])
        page.mouse.down()
        for point in points[1:]:
            page.mouse.move(*point, steps=4)
        page.mouse.up()


def test_draw_a_digit_and_see_the_answer(page, site, model_worker):
    page.goto("/models/digits/")
    draw_seven(page)
    page.click("#submit")
    card = page.locator("#current-job .job")
    expect(card).to_have_attribute("data-status", "succeeded", timeout=JOB_TIMEOUT_MS)
    bars = card.locator(".bars li")
    expect(bars).to_have_count(5)
    assert re.fullmatch(r"\d", bars.first.locator(".label").inner_text())
    assert re.fullmatch(r"\d+\.\d%", bars.first.locator(".pct").inner_text())
    expect(card.locator("canvas.seen")).to_be_visible()
    snap(page, "digits-result")

    assert _eventually(lambda: Job.objects.get().result is not None)  # recorded by watch_jobs after the page saw it
    job = Job.objects.get()
    assert (job.model, job.status, job.progress) == ("digits", Status.SUCCEEDED, 100)
    assert job.worker and job.input_file
    assert job.result["top"][0]["label"] == bars.first.locator(".label").inner_text()

    page.goto("/jobs/")
    listed = page.locator(f'.job[data-job="{job.id}"]')
    expect(listed).to_have_attribute("data-status", "succeeded")
    expect(listed.locator(".job-thumb img")).to_be_visible()
    snap(page, "my-jobs")


@pytest.mark.slow
def test_digits_drawn_with_the_mouse_are_read_right(page, site, start_model_worker, trained_digits, settings):
    settings.MODEL_DIR = trained_digits  # the real digits model, not the tiny one
    start_model_worker(MODEL_DIR=str(trained_digits))
    page.goto("/models/digits/")
    answers = {}
    for digit, strokes in MOUSE_DIGITS.items():
        page.click("#pad-clear")
        draw_strokes(page, strokes)
        seen = set(Job.objects.values_list("id", flat=True))
        page.click("#submit")
        assert _eventually(lambda: Job.objects.exclude(id__in=seen).exists())  # noqa: B023 - called at once
        job = Job.objects.exclude(id__in=seen).get()
        card = page.locator(f'#current-job .job[data-job="{job.id}"]')
        expect(card).to_have_attribute("data-status", "succeeded", timeout=JOB_TIMEOUT_MS)
        answers[digit] = card.locator(".bars li .label").first.inner_text()
        snap(page, f"drawn-{digit}")
    assert answers == {digit: digit for digit in MOUSE_DIGITS}


def test_type_a_prompt_and_watch_the_text_arrive(page, site, model_worker):
    page.goto("/models/text/")
    page.fill("#prompt", "KING HENRY:\nOnce more unto the breach")
    page.locator("#length").fill("120")
    page.click("#submit")
    card = page.locator("#current-job .job")
    expect(card).to_have_attribute("data-status", "succeeded", timeout=JOB_TIMEOUT_MS)
    generated = card.locator(".generated .cont").inner_text()
    assert len(generated) == 120
    # the page hears the result from etcd; the Job row gets it from watch_jobs, a moment later
    assert _eventually(lambda: Job.objects.get().result is not None)
    assert Job.objects.get().result["text"] == generated
    snap(page, "text-result")


def test_a_blank_drawing_gets_a_clear_message_and_no_job(page, site):
    page.goto("/models/digits/")
    page.click("#submit")
    error = page.locator("#form-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("input.image: no drawing found: the image is one flat colour")
    assert Job.objects.count() == 0
    snap(page, "bad-input")


def test_see_your_place_in_line_then_cancel(page, site, make_job, other_user):
    make_job(other_user, priority=9)
    make_job(other_user, priority=5)
    page.goto("/models/text/")
    page.fill("#prompt", "To be, or not to be")
    page.click("#submit")
    card = page.locator("#current-job .job")
    expect(card.locator(".job-line")).to_have_text("2 jobs ahead of yours")
    snap(page, "queued")

    page.goto("/jobs/")
    mine = page.locator(".job").first
    expect(mine.locator(".job-line")).to_have_text("2 jobs ahead of yours")
    mine.locator("[data-action=cancel]").click()
    expect(mine).to_have_attribute("data-status", "cancelled", timeout=15_000)
    expect(mine.locator(".job-error")).to_contain_text("cancelled")

    job = Job.objects.filter(owner__isnull=True).get()
    assert job.cancel_requested_at is not None
    assert _eventually(lambda: Job.objects.get(pk=job.pk).status == Status.CANCELLED)


def test_the_fashion_page_says_what_it_recognises(page, site):
    page.goto("/models/fashion/")
    expect(page.locator("#fashion-scope")).to_contain_text("ten kinds of clothing and nothing else")
    snap(page, "fashion")


def _eventually(predicate, timeout: float = 10.0) -> bool:
    from tests.helpers import wait_until

    return bool(wait_until(predicate, timeout=timeout, message="database caught up"))


def test_upload_a_photo_of_clothing(page, site, model_worker, tmp_path):
    from PIL import Image, ImageDraw

    from tests.ml.tiny import skip_without_fashion

    skip_without_fashion()

    photo = tmp_path / "trousers.jpg"
    image = Image.new("RGB", (300, 400), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([100, 40, 200, 90], fill=(30, 40, 90))            # waistband
    draw.polygon([(100, 90), (145, 90), (140, 370), (100, 370)], fill=(30, 40, 90))
    draw.polygon([(155, 90), (200, 90), (200, 370), (160, 370)], fill=(30, 40, 90))
    image.save(photo, quality=90)

    page.goto("/models/fashion/")
    page.set_input_files("#photo", str(photo))
    expect(page.locator("#photo-preview")).to_be_visible()
    page.click("#submit")
    card = page.locator("#current-job .job")
    expect(card).to_have_attribute("data-status", "succeeded", timeout=JOB_TIMEOUT_MS)
    labels = card.locator(".bars .label").all_inner_texts()
    assert len(labels) == 5 and set(labels) <= {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                                                  "Shirt", "Sneaker", "Bag", "Ankle boot"}
    job = Job.objects.get()
    assert job.input_file.name.endswith(".jpg") and job.input == {"image": {"$file": "image/png",
                                                                             "bytes": job.input_file.size}}
    snap(page, "fashion-result")
