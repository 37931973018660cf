"""Tiny versions of the real models (1 epoch on a subset) for tests: seconds, not minutes.

Shared by tests/ml and tests/tasks (whose worker processes load them from a model dir).
"""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ml import datasets

#: Examples (digits, fashion) or characters (text) a tiny model trains on.
TINY_LIMITS = {"digits": 400, "fashion": 2000, "text": 30_000}
#: GRU width of the tiny text model.
TINY_UNITS = 32


def skip_without_fashion() -> None:
    ok, reason = datasets.fashion_available()
    if not ok:
        pytest.skip(reason)


def train_tiny(name: str, model_dir: Path) -> dict:
    """Train a 1-epoch model ``name`` into ``model_dir`` and return its card."""
    import importlib

    module = importlib.import_module(f"ml.{name}")
    extra = {"units": TINY_UNITS} if name == "text" else {}
    return module.train(model_dir, epochs=1, limit=TINY_LIMITS[name], **extra)


def png_data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    mime = "jpeg" if fmt == "JPEG" else fmt.lower()
    return f"data:image/{mime};base64," + base64.b64encode(buffer.getvalue()).decode()


def drawing_of(grid: np.ndarray, scale: int, canvas: tuple[int, int], at: tuple[int, int]) -> Image.Image:
    """A browser-canvas-like RGBA drawing: ``grid`` (0..1 ink) blown up ``scale`` times in black
    on a transparent ``canvas`` (width, height), its top-left corner at ``at``."""
    ink = Image.fromarray((grid * 255).astype(np.uint8), mode="L")
    ink = ink.resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.Resampling.BILINEAR)
    alpha = Image.new("L", canvas, 0)
    alpha.paste(ink, at)
    black = Image.new("RGBA", canvas, (0, 0, 0, 0))
    black.putalpha(alpha)
    return black


def photo_of(garment: np.ndarray, scale: int, canvas: tuple[int, int], at: tuple[int, int]) -> Image.Image:
    """A product-photo-like RGB image: a Fashion-MNIST garment (0..1, light on black) turned
    dark on a white background, enlarged ``scale`` times and placed off-centre."""
    dark = Image.fromarray(((1.0 - garment) * 255).astype(np.uint8), mode="L")
    dark = dark.resize((garment.shape[1] * scale, garment.shape[0] * scale), Image.Resampling.BICUBIC)
    photo = Image.new("L", canvas, 255)
    photo.paste(dark, at)
    return photo.convert("RGB")
