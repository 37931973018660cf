"""Payload checks and preprocessing: good input becomes what the model was trained on, bad
input gets an error naming the field and the limit. No TensorFlow needed here."""
from __future__ import annotations

import base64
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ml import datasets, inputs
from ml.errors import InvalidInput
from ml.images import MAX_DATA_URL_CHARS
from ml.registry import MODELS
from tests.helpers import REPO_ROOT
from tests.ml.tiny import drawing_of, photo_of, png_data_url, skip_without_fashion


def refused(model: str, payload) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        MODELS[model].validate(payload)
    return info.value


def test_it_imports_no_tensorflow_in_the_web_process():
    # jobs.tasks and ml.serving load in the web process too (the app autodiscovers tasks);
    # validating every model's input and reading cards must not pull TensorFlow in either.
    code = ("import sys, django; django.setup(); import ml.serving, jobs.tasks; from ml.registry import MODELS; "
            "grid = [0.0] * 27 + [1.0] * 10 + [0.0] * 27; "
            "MODELS['digits'].validate({'pixels': grid}); MODELS['fashion'].validate({'pixels': grid}); "
            "MODELS['text'].validate({'prompt': 'To be', 'length': 5}); "
            "[(s.available('var/models'), s.card('var/models')) for s in MODELS.values()]; "
            "bad = [m for m in ('tensorflow', 'keras') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                         env={**os.environ, "DJANGO_SETTINGS_MODULE": "deephardway_site.settings"})
    assert run.returncode == 0, run.stdout + run.stderr


def test_it_centres_and_scales_a_drawn_digit_like_load_digits():
    split = datasets.digits()
    correlations = []
    for original in split.x_test[:20, :, :, 0]:
        # The same digit drawn small in a corner and large near the top of a 280x280 canvas.
        small = inputs.digits_input({"image": png_data_url(drawing_of(original, 12, (280, 280), (5, 170)))})
        large = inputs.digits_input({"image": png_data_url(drawing_of(original, 30, (280, 280), (20, 10)))})
        assert small.shape == (8, 8) and np.abs(small - large).mean() < 0.05
        assert (small > 0.05).any(axis=1).all()  # like every load_digits image: all 8 rows inked
        assert small.max() == pytest.approx(1.0)
        correlations.append(np.corrcoef(small.ravel(), original.ravel())[0, 1])
    # Each load_digits image sits within about a pixel of centre; ours are centred exactly.
    assert np.mean(correlations) > 0.85, correlations


def test_it_makes_a_drawn_one_fill_the_height_and_sit_in_the_middle():
    canvas = Image.new("RGBA", (280, 280), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).line([(60, 40), (60, 240)], fill=(0, 0, 0, 255), width=18)
    grid = inputs.digits_input({"image": png_data_url(canvas)})
    rows_with_ink = (grid > 0.2).any(axis=1)
    columns_with_ink = np.flatnonzero((grid > 0.2).any(axis=0))
    assert rows_with_ink.all()  # load_digits: every digit spans all 8 rows
    assert set(columns_with_ink) <= {3, 4}  # a narrow stroke, centred


def test_it_reads_white_on_black_drawings_and_pixel_grids_alike():
    grid = np.zeros((64, 64))
    grid[10:54, 30:36] = 1.0
    from_pixels = inputs.digits_input({"pixels": grid.ravel().tolist()})
    inverted = Image.fromarray(((1 - grid) * 255).astype(np.uint8))
    from_dark_ink = inputs.digits_input({"image": png_data_url(inverted)})
    light_on_dark = Image.fromarray((grid * 255).astype(np.uint8))
    from_light_ink = inputs.digits_input({"image": png_data_url(light_on_dark)})
    assert np.allclose(from_pixels, from_dark_ink, atol=0.05)
    assert np.allclose(from_pixels, from_light_ink, atol=0.05)


def test_it_turns_a_product_photo_into_a_fashion_mnist_image():
    skip_without_fashion()
    split = datasets.fashion()
    correlations = []
    for original in split.x_test[:20, :, :, 0]:
        # Dark garment on white, 9x larger, off-centre, JPEG: what a shop photo looks like.
        photo = photo_of(original, 9, (400, 320), (30, 50))
        seen = inputs.fashion_input({"image": png_data_url(photo, "JPEG")})
        assert seen.shape == (28, 28) and seen.max() <= 1.0
        ink = seen > 0.12
        assert max(np.ptp(np.flatnonzero(ink.any(axis=0))), np.ptp(np.flatnonzero(ink.any(axis=1)))) >= 26
        correlations.append(np.corrcoef(seen.ravel(), original.ravel())[0, 1])
    assert np.mean(correlations) > 0.9, correlations


@pytest.mark.parametrize(("model", "payload", "field", "says"), [
    ("digits", [1, 2], "payload", "JSON object"),
    ("digits", {}, "image", "either 'image'"),
    ("digits", {"image": "x", "pixels": [0] * 64}, "image", "either 'image'"),
    ("digits", {"image": "data:text/plain;base64,aGk="}, "image", "data URL like"),
    ("digits", {"image": "data:image/png;base64,@@@"}, "image", "not valid base64"),
    ("digits", {"image": "data:image/png;base64," + base64.b64encode(b"not a png").decode()}, "image",
     "not a readable"),
    ("digits", {"image": "data:image/png;base64," + "A" * MAX_DATA_URL_CHARS}, "image", "the limit is 1,000,000"),
    ("digits", {"pixels": [0.5] * 10}, "pixels", "8x8 to 512x512"),
    ("digits", {"pixels": [0.0] * 63 + [2.0]}, "pixels", "from 0 to 1"),
    ("digits", {"pixels": [0.0] * 63 + ["a"]}, "pixels", "from 0 to 1"),
    ("digits", {"pixels": [0.0] * 100, "width": 7}, "width", "from 8 to 512"),
    ("digits", {"pixels": [0.0] * 100, "width": 12}, "pixels", "rows of width 12"),
    ("digits", {"pixels": [0.0] * 64}, "pixels", "no drawing found"),
    ("digits", {"pixels": [0.0] * 64, "colour": "red"}, "colour", "unknown field"),
    ("fashion", {"pixels": [0.3] * 784}, "pixels", "no garment found"),
    ("text", {"prompt": 5}, "prompt", "at most 500"),
    ("text", {"prompt": "x" * 501}, "prompt", "the limit is 500"),
    ("text", {"prompt": "caf\u00e9 \u2603"}, "prompt", "'\u00e9' '\u2603'"),
    ("text", {"prompt": "Hi", "length": 0}, "length", "from 1 to 1000"),
    ("text", {"prompt": "Hi", "length": 1001}, "length", "from 1 to 1000"),
    ("text", {"prompt": "Hi", "length": 2.5}, "length", "an integer"),
    ("text", {"prompt": "Hi", "length": True}, "length", "an integer"),
    ("text", {"prompt": "Hi", "temperature": 0.05}, "temperature", "from 0.1 to 2.0"),
    ("text", {"prompt": "Hi", "temperature": "hot"}, "temperature", "a number"),
    ("text", {"prompt": "Hi", "seed": -1}, "seed", "from 0 to"),
    ("text", {"mode": "poem"}, "mode", "generate, suggest"),
    ("text", {"mode": "suggest", "prompt": "   "}, "prompt", "some text"),
    ("text", {"mode": "suggest", "prompt": "Hi", "length": 5}, "length", "unknown field"),
])
def test_it_refuses_bad_input_naming_the_field_and_limit(model, payload, field, says):
    error = refused(model, payload)
    assert error.field == field
    assert says in str(error) and str(error).startswith(f"{field}: ")


def test_it_refuses_an_image_too_large_to_decode():
    huge = Image.new("L", (5000, 4000), 255)
    error = refused("fashion", {"image": png_data_url(huge)})
    assert error.field == "image" and "the limit is 16,777,216 pixels" in str(error)


def test_it_fills_in_text_defaults_and_folds_typography():
    assert MODELS["text"].validate({"prompt": "\u201cHark\u201d \u2014 who\u2019s there?"}) == {
        "mode": "generate", "prompt": "'Hark' - who's there?", "length": 200, "temperature": 0.8}
    assert MODELS["text"].validate({"mode": "suggest", "prompt": "To be or"}) == {
        "mode": "suggest", "prompt": "To be or"}


def test_it_reports_fashion_unavailable_with_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "FASHION_DIR", tmp_path / "nothing-here")
    ok, reason = MODELS["fashion"].available()
    assert not ok and "apt-get install dataset-fashion-mnist" in reason
    assert MODELS["digits"].available() == (True, "")
