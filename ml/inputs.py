"""Cheap, TensorFlow-free checks of request payloads, one function per model.

Each ``check_*`` takes the JSON payload a client sent and returns it normalised (defaults
filled in, nothing else added) or raises ``InvalidInput`` naming the field and its limit.
"""
from __future__ import annotations

import logging
import string
from collections.abc import Callable
from typing import Any

import numpy as np

from ml.errors import InvalidInput
from ml.images import MIN_SIDE, decode_data_url, digits_grid, fashion_image, grey_array, pixels_array

logger = logging.getLogger(__name__)

#: Smallest and largest side of a ``pixels`` grid.
PIXELS_SIDE = (MIN_SIDE, 512)
#: Longest prompt for the text model, in characters.
PROMPT_MAX_CHARS = 500
#: How many characters one generation may produce.
LENGTH_RANGE = (1, 1000)
#: Sampling temperature: lower is more predictable, higher more adventurous.
TEMPERATURE_RANGE = (0.1, 2.0)
DEFAULT_LENGTH = 200
DEFAULT_TEMPERATURE = 0.8
#: Largest seed accepted (it feeds a stateless int32 random generator).
MAX_SEED = 2**31 - 1
#: Every character the text model knows; the corpus is filtered to these.
ALPHABET = "\n " + string.ascii_letters + string.digits + "!&'(),-.:;?[]"
#: Typographic characters folded onto the alphabet before checking a prompt.
FOLD = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": "'", "\u201d": "'", '"': "'",
                      "\u2013": "-", "\u2014": "-", "\t": " ", "\r": None, "\u2026": "..."})
TEXT_MODES = ("generate", "suggest")
#: JSON numbers arrive as these exact types (bool, a subclass of int, is refused).
NUMBER_TYPES = frozenset({int, float})


def only_keys(payload: Any, allowed: set[str]) -> dict:
    """The payload must be an object with no keys outside ``allowed``."""
    if not isinstance(payload, dict):
        raise InvalidInput("payload", f"must be a JSON object, got {type(payload).__name__}")
    extra = sorted(set(payload) - allowed)
    if extra:
        raise InvalidInput(extra[0], f"unknown field; allowed: {', '.join(sorted(allowed))}")
    return payload


def number(payload: dict, field: str, low: float, high: float, default: float, integer: bool) -> float:
    """A number within [low, high]; booleans and strings are refused."""
    value = payload.get(field, default)
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise InvalidInput(field, f"must be {'an integer' if integer else 'a number'} from {low} to {high}")
    if not low <= value <= high:
        raise InvalidInput(field, f"is {value}; must be from {low} to {high}")
    return value


def image_source(payload: dict) -> str:
    """Exactly one of ``image`` (data URL) and ``pixels`` (list of 0..1 floats)."""
    if ("image" in payload) == ("pixels" in payload):
        raise InvalidInput("image", "send either 'image' (a data URL) or 'pixels' (a list of numbers 0..1)")
    return "image" if "image" in payload else "pixels"


def pixels_grid(payload: dict) -> Any:
    """Check ``pixels`` (+ optional ``width``) and return it as a 2-D array."""
    pixels, width = payload["pixels"], payload.get("width")
    low, high = PIXELS_SIDE
    if not isinstance(pixels, list) or not low * low <= len(pixels) <= high * high:
        raise InvalidInput("pixels", f"must be a list of {low}x{low} to {high}x{high} numbers, row by row")
    if width is not None:
        number(payload, "width", low, high, low, integer=True)
    if not set(map(type, pixels)) <= NUMBER_TYPES:  # 6x faster than isinstance() per value
        raise InvalidInput("pixels", "every value must be a number from 0 to 1")
    grid = pixels_array("pixels", pixels, width)
    if min(grid.shape) < low:
        raise InvalidInput("pixels", f"grid is {grid.shape[1]}x{grid.shape[0]}; each side must be at least {low}")
    return grid


def image_input(payload: Any, convert: Callable[[str, np.ndarray], np.ndarray]) -> np.ndarray:
    """Check an image payload and convert it with ``convert(field, grey_or_pixels)``."""
    payload = only_keys(payload, {"image", "pixels", "width"})
    if image_source(payload) == "image":
        image = decode_data_url("image", payload["image"])
        if min(image.size) < PIXELS_SIDE[0]:  # the same floor as a pixels grid's
            raise InvalidInput("image", f"image is {image.width}x{image.height}; each side must be at least "
                                        f"{PIXELS_SIDE[0]} pixels")
        return convert("image", grey_array(image))
    return convert("pixels", pixels_grid(payload))


def digits_input(payload: Any) -> np.ndarray:
    """Digits: ``{"image": data URL}`` or ``{"pixels": [...], "width": W}`` as the 8x8 grid (0..1)."""
    return image_input(payload, digits_grid)


def fashion_input(payload: Any) -> np.ndarray:
    """Fashion: ``{"image": data URL}`` (a photo) or ``{"pixels": [...], "width": W}`` (1 = garment)
    as the 28x28 Fashion-MNIST-style image (0..1)."""
    return image_input(payload, fashion_image)


def check_digits(payload: Any) -> dict:
    digits_input(payload)
    return payload


def check_fashion(payload: Any) -> dict:
    fashion_input(payload)
    return payload


def clean_prompt(prompt: Any, required: bool) -> str:
    """Fold typographic quotes and dashes, then refuse characters the model never saw."""
    if not isinstance(prompt, str):
        raise InvalidInput("prompt", f"must be a string of at most {PROMPT_MAX_CHARS} characters")
    prompt = prompt.translate(FOLD)
    if len(prompt) > PROMPT_MAX_CHARS:
        raise InvalidInput("prompt", f"is {len(prompt)} characters; the limit is {PROMPT_MAX_CHARS}")
    if required and not prompt.strip():
        raise InvalidInput("prompt", "must contain some text to suggest the next word for")
    unknown = sorted(set(prompt) - set(ALPHABET))
    if unknown:
        shown = " ".join(repr(c) for c in unknown[:5])
        raise InvalidInput("prompt", f"contains characters the model does not know: {shown} "
                                     "(use English letters, digits, spaces and . , ; : ! ? ' - ( ) [ ] &)")
    return prompt


def check_text(payload: Any) -> dict:
    """Text: ``{"mode": "generate", "prompt", "length", "temperature", "seed"?}`` or
    ``{"mode": "suggest", "prompt"}``."""
    payload = only_keys(payload, {"mode", "prompt", "length", "temperature", "seed"})
    mode = payload.get("mode", "generate")
    if mode not in TEXT_MODES:
        raise InvalidInput("mode", f"must be one of {', '.join(TEXT_MODES)}")
    if mode == "suggest":
        only_keys(payload, {"mode", "prompt"})
        return {"mode": mode, "prompt": clean_prompt(payload.get("prompt"), required=True)}
    clean = {
        "mode": mode,
        "prompt": clean_prompt(payload.get("prompt", ""), required=False),
        "length": number(payload, "length", *LENGTH_RANGE, DEFAULT_LENGTH, integer=True),
        "temperature": float(number(payload, "temperature", *TEMPERATURE_RANGE, DEFAULT_TEMPERATURE, False)),
    }
    if "seed" in payload:
        clean["seed"] = number(payload, "seed", 0, MAX_SEED, 0, integer=True)
    return clean
