"""Property tests of every model's TensorFlow-free checks and of ml/images.py: whatever a client
sends (any JSON, wrong types, broken or enormous images), the answer is the model's input of the
right shape and range, or ``InvalidInput`` naming the field; never another exception."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from ml import images, inputs
from ml.errors import InvalidInput
from ml.registry import MODELS
from tests.security.bad_images import (
    any_images,
    bombs,
    broken_images,
    data_url,
    encode,
    noise_behind_a_signature,
)

logger = logging.getLogger(__name__)

#: Examples per property: enough to hit every branch of the checks, small enough for CI's 2 cores.
EXAMPLES = 100
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
IMAGE_MODELS = ("digits", "fashion")
#: The grid each image model looks at, by model.
GRID_SIDE = {"digits": images.DIGITS_SIDE, "fashion": images.FASHION_SIDE}
PIXEL_LIMIT_TEXT = f"{images.MAX_IMAGE_PIXELS:,}"

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
image_kinds = st.sampled_from(["image/png", "image/jpeg", "image/gif", "image/webp", "image/svg+xml",
                               "text/html", "application/octet-stream", "IMAGE/PNG"])
data_urls = st.builds(data_url, any_images(), image_kinds)
#: JSON numbers, including integers too large for any float.
numbers = st.floats(0, 1) | st.floats() | st.integers() | st.integers(min_value=10**309)
pixel_values = st.one_of(st.floats(), st.integers(), st.floats(0, 1), st.booleans(), st.text(max_size=3),
                         st.none(), st.lists(st.floats(0, 1), max_size=2))


def fields_of(name: str) -> set[str]:
    return set(MODELS[name].input_schema["properties"])


@st.composite
def model_payloads(draw, name: str) -> dict:
    """An object with the model's own field names (and sometimes a stranger), any values."""
    fields = sorted(fields_of(name)) + ["extra", ""]
    values = {"image": data_urls | json_values,
              "pixels": st.lists(numbers, min_size=60, max_size=300) | st.lists(pixel_values, max_size=300) | json_values,
              "prompt": st.text(max_size=600) | json_values}
    keys = draw(st.lists(st.sampled_from(fields), unique=True, max_size=5))
    return {key: draw(values.get(key, json_values | st.integers(-10, 3000) | st.floats(-1, 3))) for key in keys}


def check(name: str, payload) -> tuple[dict | None, InvalidInput | None]:
    """The model's check: (normalised payload, None) or (None, its InvalidInput); anything else raises."""
    try:
        return MODELS[name].validate(payload), None
    except InvalidInput as exc:
        return None, exc


def assert_names_a_field(exc: InvalidInput, name: str, payload) -> None:
    allowed = fields_of(name) | {"payload"} | (set(payload) if isinstance(payload, dict) else set())
    assert exc.field in allowed, exc
    assert isinstance(exc.message, str) and exc.message.strip(), exc
    assert str(exc) == f"{exc.field}: {exc.message}"


@pytest.mark.parametrize("name", list(MODELS))
@PROPERTY
@given(data=st.data())
def test_any_json_payload_is_normalised_or_refused_naming_a_field(name, data):
    payload = data.draw(json_values | model_payloads(name), label="payload")
    clean, refused = check(name, payload)
    if refused is not None:
        assert_names_a_field(refused, name, payload)
    else:
        assert isinstance(clean, dict) and set(clean) <= fields_of(name)


@pytest.mark.parametrize("name", IMAGE_MODELS)
@PROPERTY
@given(raw=broken_images(), kind=image_kinds)
def test_a_broken_image_is_refused_on_the_image_field(name, raw, kind):
    clean, refused = check(name, {"image": data_url(raw, kind)})
    assert clean is None, "a broken image was accepted"
    assert refused.field == "image" and refused.message


@pytest.mark.parametrize("name", IMAGE_MODELS)
@PROPERTY
@given(raw=any_images())
def test_any_image_becomes_the_models_grid_or_is_refused(name, raw):
    convert = inputs.digits_input if name == "digits" else inputs.fashion_input
    try:
        grid = convert({"image": data_url(raw)})
    except InvalidInput as exc:
        assert exc.field == "image" and exc.message
        return
    side = GRID_SIDE[name]
    assert grid.shape == (side, side) and grid.dtype == np.float32
    assert 0.0 <= grid.min() and grid.max() <= 1.0 + 1e-6
    assert grid.max() > 0.0  # something was found, or it would have been refused as one flat colour


@pytest.mark.parametrize("bomb", sorted(bombs()))
def test_a_decompression_bomb_is_refused_naming_the_pixel_limit(bomb):
    raw = bombs()[bomb]
    with pytest.raises(InvalidInput) as refused:
        images.open_image("image", raw)
    assert refused.value.field == "image"
    assert PIXEL_LIMIT_TEXT in refused.value.message, refused.value.message
    for name in IMAGE_MODELS:  # the same through each model's check
        _, exc = check(name, {"image": data_url(raw)})
        assert exc is not None and PIXEL_LIMIT_TEXT in exc.message


@pytest.mark.parametrize("header", [b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n",
                                    b"BM", b"II*\x00"])
def test_formats_the_site_does_not_take_are_never_parsed(header):
    """EPS would run Ghostscript where it is installed; BMP and TIFF are not in the promise."""
    if header == b"BM":
        header = encode(Image.new("L", (16, 16)), "BMP")
    elif header == b"II*\x00":
        header = encode(Image.new("L", (16, 16)), "TIFF")
    with pytest.raises(InvalidInput) as refused:
        images.open_image("image", header)
    assert "PNG, JPEG, WebP or GIF" in refused.value.message


@PROPERTY
@given(raw=any_images())
def test_an_upload_is_re_encoded_as_a_small_png_or_refused(raw):
    try:
        url = images.image_to_data_url(raw)
    except InvalidInput as exc:
        assert exc.field == "image" and exc.message
        return
    assert url.startswith("data:image/png;base64,") and len(url) <= images.MAX_DATA_URL_CHARS
    decoded = images.decode_data_url("image", url)
    assert max(decoded.size) <= images.UPLOAD_MAX_SIDE and decoded.mode == "L"


@PROPERTY
@given(url=st.text(max_size=200) | st.builds(lambda s: "data:image/png;base64," + s, st.text(max_size=200))
       | noise_behind_a_signature().map(lambda raw: data_url(raw)) | json_values)
def test_a_malformed_data_url_is_refused_on_its_field(url):
    try:
        image = images.decode_data_url("image", url)
    except InvalidInput as exc:
        assert exc.field == "image" and exc.message
        return
    assert image.mode == "L"  # only possible for valid base64 of a real image


def test_an_oversized_data_url_is_refused_naming_the_limit():
    url = "data:image/png;base64," + "A" * images.MAX_DATA_URL_CHARS
    with pytest.raises(InvalidInput) as refused:
        images.decode_data_url("image", url)
    assert f"{images.MAX_DATA_URL_CHARS:,}" in refused.value.message


@st.composite
def ink_grids(draw) -> tuple[list[float], int, int]:
    """A valid ``pixels`` grid (8..64 a side) with at least one stroke of ink."""
    width, height = draw(st.integers(8, 64)), draw(st.integers(8, 64))
    grid = np.zeros((height, width), dtype=np.float32)
    top, left = draw(st.integers(0, height - 1)), draw(st.integers(0, width - 1))
    grid[top:top + draw(st.integers(1, height)), left:left + draw(st.integers(1, width))] = draw(
        st.floats(0.3, 1.0))
    return [float(v) for v in grid.ravel()], width, height


@pytest.mark.parametrize("name", IMAGE_MODELS)
@PROPERTY
@given(grid=ink_grids(), send_width=st.booleans())
def test_a_valid_pixel_grid_becomes_the_models_grid(name, grid, send_width):
    pixels, width, height = grid
    if not send_width and width != height:
        send_width = True  # a non-square grid needs its width
    payload = {"pixels": pixels, **({"width": width} if send_width else {})}
    convert = inputs.digits_input if name == "digits" else inputs.fashion_input
    clean, refused = check(name, payload)
    if refused is not None:  # a stroke as wide as the whole grid leaves no background to see it on
        assert refused.field == "pixels" and "flat colour" in refused.message
        return
    assert clean == payload
    out = convert(payload)
    side = GRID_SIDE[name]
    assert out.shape == (side, side) and 0.0 <= out.min() and out.max() <= 1.0 + 1e-6 and out.max() > 0


@pytest.mark.parametrize("name", IMAGE_MODELS)
@PROPERTY
@given(pixels=st.lists(numbers, min_size=60, max_size=700) | st.lists(pixel_values, max_size=300) | json_values,
       width=st.none() | json_values | st.integers(-5, 600))
def test_a_malformed_pixel_grid_is_refused_on_pixels_or_width(name, pixels, width):
    payload = {"pixels": pixels} if width is None else {"pixels": pixels, "width": width}
    clean, refused = check(name, payload)
    if refused is not None:
        assert refused.field in ("pixels", "width") and refused.message
    else:
        assert isinstance(pixels, list) and all(type(v) in (int, float) and 0 <= v <= 1 for v in pixels)


ALPHABET_TEXT = st.text(alphabet=inputs.ALPHABET, max_size=inputs.PROMPT_MAX_CHARS)


@PROPERTY
@given(prompt=ALPHABET_TEXT, length=st.none() | st.integers(*inputs.LENGTH_RANGE),
       temperature=st.none() | st.floats(*inputs.TEMPERATURE_RANGE), seed=st.none() | st.integers(0, inputs.MAX_SEED))
def test_a_valid_text_request_is_normalised_with_defaults(prompt, length, temperature, seed):
    payload = {"prompt": prompt, "length": length, "temperature": temperature, "seed": seed}
    payload = {k: v for k, v in payload.items() if v is not None}
    clean = MODELS["text"].validate(payload)
    assert clean["mode"] == "generate" and clean["prompt"] == prompt
    assert clean["length"] == payload.get("length", inputs.DEFAULT_LENGTH)
    assert clean["temperature"] == pytest.approx(payload.get("temperature", inputs.DEFAULT_TEMPERATURE))
    assert ("seed" in clean) == ("seed" in payload)


@PROPERTY
@given(prompt=st.text(max_size=700))
def test_any_prompt_is_cleaned_onto_the_alphabet_or_refused_naming_it(prompt):
    for mode in inputs.TEXT_MODES:
        clean, refused = check("text", {"mode": mode, "prompt": prompt})
        if refused is not None:
            assert refused.field == "prompt" and refused.message
            continue
        assert set(clean["prompt"]) <= set(inputs.ALPHABET)
        assert len(clean["prompt"]) <= inputs.PROMPT_MAX_CHARS


#: The text model's numeric fields: (integer only, lowest, highest).
TEXT_NUMBERS = {"length": (True, *inputs.LENGTH_RANGE), "temperature": (False, *inputs.TEMPERATURE_RANGE),
                "seed": (True, 0, inputs.MAX_SEED)}


def in_range(field: str, value) -> bool:
    integer, low, high = TEXT_NUMBERS[field]
    if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
        return False
    return not math.isnan(value) and low <= value <= high


@PROPERTY
@given(field=st.sampled_from(sorted(TEXT_NUMBERS)), value=json_values | st.integers() | st.floats())
def test_a_wrong_typed_or_out_of_range_text_number_is_refused_naming_it(field, value):
    assume(not in_range(field, value))
    _, refused = check("text", {"prompt": "To be", field: value})
    assert refused is not None and refused.field == field, (field, value)
    assert str(TEXT_NUMBERS[field][2]) in refused.message  # the limit is named


def garment_url() -> str:
    """A dark upright rectangle on white: what the fashion check takes as a garment."""
    canvas = Image.new("L", (40, 40), 255)
    canvas.paste(0, (10, 5, 30, 35))
    return data_url(encode(canvas, "PNG"))


GOOD_PAYLOADS = {"digits": lambda: {"pixels": [0.0] * 27 + [1.0] * 10 + [0.0] * 27},
                 "fashion": lambda: {"image": garment_url()},
                 "text": lambda: {"prompt": "ROMEO:", "length": 5}}
BAD_PAYLOADS = [{"image": "data:image/png;base64,AAAA"}, {"pixels": [2] * 64}, {"prompt": "\u00e9"}, [],
                {"image": data_url(b"\x89PNG\r\n\x1a\n" + bytes(40))}, {"length": "5"}]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_the_workers_preprocess_agrees_with_the_web_check(name):
    """The worker's ``preprocess`` (its module imports TensorFlow) refuses what the web side
    refuses, with the same InvalidInput, and shapes good input for the model."""
    import importlib

    module = importlib.import_module(MODELS[name].module)
    for bad in BAD_PAYLOADS:
        _, web = check(name, bad)
        with pytest.raises(InvalidInput) as worker:
            module.preprocess(bad)
        assert (worker.value.field, worker.value.message) == (web.field, web.message)
    payload = GOOD_PAYLOADS[name]()
    out = module.preprocess(payload)
    if name == "text":
        assert out == MODELS["text"].validate(payload)
    else:
        side = GRID_SIDE[name]
        assert out.shape == (side, side, 1) and out.dtype == np.float32
        assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0 + 1e-6
