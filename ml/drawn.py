"""Digits drawn the way people draw them on the page, for measuring the digits model on them.

Each digit has a few hand-written stroke templates (pen paths in a unit box, several styles:
a 7 with and without a bar, open and closed 4s, ...). A drawing picks a style, wobbles its
points, slants, rotates and stretches it, puts it at a random size and place on the page's
280x280 pad, draws it with round pen ends at a random thickness in the pad's ink, in a random
stroke order and direction, and sends it through exactly what the page does: a PNG data URL,
the web side's reduction to a 64x64 ``pixels`` grid, then the model's own preprocessing.

These templates are used for evaluation only: training augments scikit-learn's digits
(``ml.augment``) and never sees a stroke drawn here.
"""
from __future__ import annotations

import base64
import io
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ml import images, inputs

logger = logging.getLogger(__name__)

#: Side of the page's drawing pad (frontend/templates/frontend/widgets/digits.html).
PAD = 280
#: The pad's ink (#111827, frontend/static/frontend/draw.js) as a grey level.
INK = round(0.299 * 0x11 + 0.587 * 0x18 + 0.114 * 0x27)
#: The pad's background (white).
PAPER = 255
#: Drawn this many times larger, then reduced: the anti-aliased edge a browser canvas draws.
SUPERSAMPLE = 4
#: Pen widths in pad pixels (the page draws 20; other pens and screens draw thinner or bolder).
THICKNESS = (8.0, 34.0)
#: Digit height in pad pixels, from small to filling the pad.
HEIGHT = (70.0, 250.0)
#: Slant (horizontal shift per unit of height, top to the right when positive).
SLANT = (-0.3, 0.45)
#: Rotation in degrees.
ROTATION = (-12.0, 12.0)
#: Width relative to the template's.
STRETCH = (0.75, 1.3)
#: Hand wobble: how far (in digit heights) the strokes bend and drift (a smooth random warp).
WOBBLE = 0.04
#: Boldest pen relative to the digit's height (a small digit with a fat pen is a blot).
MAX_THICKNESS_RATIO = 0.25
#: Seed of the standard drawn test set (the model card reports accuracy on it).
SEED = 2026
#: Digits per class in the standard drawn test set.
PER_DIGIT = 40

Stroke = list[tuple[float, float]]


def arc(cx: float, cy: float, rx: float, ry: float, start: float, end: float, n: int = 24) -> Stroke:
    """Points on an ellipse from angle ``start`` to ``end`` (degrees; 0 = right, 90 = down)."""
    t = np.radians(np.linspace(start, end, n))
    return [(cx + rx * np.cos(a), cy + ry * np.sin(a)) for a in t]


def line(*points: tuple[float, float]) -> Stroke:
    return list(points)


def eight(cx: float, cy: float, a: float, b: float, n: int = 48) -> Stroke:
    """A figure eight in one stroke (a lemniscate of Gerono stood upright), from its top."""
    t = np.linspace(-np.pi / 2, 1.5 * np.pi, n)
    return [(cx - a * np.sin(2 * s), cy + b * np.sin(s)) for s in t]


#: Styles per digit: each a list of strokes, points (x, y) with y down, the digit about 1 high.
TEMPLATES: dict[int, list[list[Stroke]]] = {
    0: [[arc(0.3, 0.5, 0.28, 0.5, -90, 270, 40)],
        [arc(0.3, 0.5, 0.24, 0.5, -80, -440, 40)],
        [arc(0.32, 0.5, 0.3, 0.48, -60, 310, 40)]],
    1: [[line((0.3, 0.0), (0.3, 1.0))],
        [line((0.1, 0.22), (0.32, 0.0), (0.32, 1.0))],
        [line((0.12, 0.2), (0.3, 0.0), (0.3, 1.0)), line((0.08, 1.0), (0.52, 1.0))],
        [line((0.34, 0.0), (0.26, 1.0))]],
    2: [[arc(0.3, 0.28, 0.27, 0.27, 200, 370, 20) + line((0.02, 1.0), (0.62, 1.0))],
        [arc(0.3, 0.26, 0.28, 0.25, 180, 380, 20) + line((0.08, 0.86)) + arc(0.14, 0.9, 0.08, 0.08, 200, -270, 16)
         + line((0.62, 0.98))],
        [arc(0.32, 0.25, 0.26, 0.24, 210, 390, 18) + line((0.05, 0.9), (0.12, 0.84), (0.2, 0.95),
                                                          (0.14, 1.0), (0.62, 1.0))]],
    3: [[arc(0.3, 0.25, 0.26, 0.24, 200, 450, 20) + arc(0.3, 0.74, 0.3, 0.26, -90, 150, 22)],
        [line((0.05, 0.0), (0.55, 0.0), (0.25, 0.42)) + arc(0.3, 0.72, 0.3, 0.28, -100, 150, 22)],
        [arc(0.3, 0.25, 0.26, 0.24, 190, 450, 20), arc(0.3, 0.74, 0.31, 0.26, -90, 160, 22)]],
    4: [[line((0.42, 0.0), (0.0, 0.66), (0.62, 0.66)), line((0.46, 0.3), (0.46, 1.0))],
        [line((0.46, 1.0), (0.46, 0.0), (0.0, 0.68), (0.64, 0.68))],
        [line((0.08, 0.0), (0.04, 0.6), (0.6, 0.6)), line((0.46, 0.05), (0.46, 1.0))]],
    5: [[line((0.58, 0.0), (0.1, 0.0), (0.06, 0.45)) + arc(0.3, 0.7, 0.29, 0.3, -150, 150, 24)],
        [line((0.1, 0.0), (0.06, 0.45)) + arc(0.3, 0.7, 0.29, 0.3, -150, 150, 24), line((0.1, 0.0), (0.6, 0.0))],
        [line((0.56, 0.02), (0.12, 0.0), (0.1, 0.42)) + arc(0.28, 0.68, 0.3, 0.32, -140, 140, 24)]],
    6: [[arc(0.62, 0.62, 0.58, 0.62, -80, -180, 14) + arc(0.32, 0.72, 0.28, 0.27, 180, 540, 30)],
        [line((0.5, 0.0), (0.08, 0.6)) + arc(0.32, 0.73, 0.27, 0.27, 200, 560, 30)]],
    7: [[line((0.0, 0.0), (0.62, 0.0), (0.2, 1.0))],
        [line((0.0, 0.0), (0.62, 0.0), (0.22, 1.0)), line((0.14, 0.5), (0.56, 0.5))],
        [line((0.0, 0.14), (0.02, 0.0), (0.6, 0.0)) + arc(-0.35, 0.05, 0.95, 0.95, -5, 70, 12)[1:]],
        [line((0.04, 0.02), (0.6, 0.0), (0.36, 0.5), (0.3, 1.0))]],
    8: [[eight(0.3, 0.5, 0.28, 0.5)],
        [arc(0.3, 0.25, 0.22, 0.25, 0, 360, 28), arc(0.3, 0.74, 0.28, 0.26, -90, 270, 28)],
        [arc(0.3, 0.26, 0.24, 0.26, 90, -260, 28) + arc(0.3, 0.75, 0.28, 0.25, -90, 280, 28)]],
    9: [[arc(0.3, 0.27, 0.27, 0.27, 0, -360, 30) + line((0.57, 0.3), (0.5, 1.0))],
        [arc(0.3, 0.28, 0.28, 0.28, -10, -370, 30) + arc(-0.1, 0.3, 0.66, 0.7, 0, 100, 14)[1:]],
        [arc(0.28, 0.27, 0.26, 0.27, 10, -350, 30), line((0.56, 0.05), (0.56, 1.0))]],
}


@dataclass(frozen=True)
class Drawing:
    """One drawn digit: its label, how it was drawn, and the data URL the page would send."""

    label: int
    style: int
    thickness: float
    height: float
    slant: float
    url: str


def place(strokes: list[Stroke], rng: np.random.Generator) -> tuple[list[np.ndarray], float, float]:
    """Wobble, slant, rotate, stretch, scale and place the strokes on the pad (pad pixels)."""
    slant, stretch = rng.uniform(*SLANT), rng.uniform(*STRETCH)
    angle = np.radians(rng.uniform(*ROTATION))
    height = rng.uniform(*HEIGHT)
    frequency, phase = rng.uniform(1.5, 4.0, (2, 2, 2)), rng.uniform(0, 2 * np.pi, (2, 2))
    paths = []
    for stroke in strokes:
        points = np.asarray(stroke, dtype=float) + rng.normal(0, WOBBLE / 3, 2)  # each stroke drifts
        points = points + WOBBLE * np.sin(points @ frequency[0] + phase[0]) * np.sin(points @ frequency[1] + phase[1])
        x, y = (points[:, 0] - 0.3) * stretch, points[:, 1] - 0.5
        x = x - slant * y
        x, y = x * np.cos(angle) - y * np.sin(angle), x * np.sin(angle) + y * np.cos(angle)
        paths.append(np.stack([x, y], axis=1) * height)
    every = np.concatenate(paths)
    low, high = every.min(axis=0), every.max(axis=0)
    span = high - low
    scale = min(1.0, (PAD - 12) / max(span.max(), 1.0))  # a digit larger than the pad is shrunk to fit
    margin = PAD - span * scale
    origin = rng.uniform(0.1, 0.9, 2) * margin - low * scale
    return [path * scale + origin for path in paths], height * scale, slant


def render(paths: list[np.ndarray], thickness: float, rng: np.random.Generator) -> Image.Image:
    """Draw the paths like the pad (round caps and joins, anti-aliased), in a random stroke
    order and direction; returns the pad as a greyscale image."""
    big = Image.new("L", (PAD * SUPERSAMPLE, PAD * SUPERSAMPLE), PAPER)
    draw = ImageDraw.Draw(big)
    width = thickness * SUPERSAMPLE
    for index in rng.permutation(len(paths)):
        path = paths[index][::-1] if rng.random() < 0.5 else paths[index]
        points = [(float(x) * SUPERSAMPLE, float(y) * SUPERSAMPLE) for x, y in path]
        draw.line(points, fill=INK, width=round(width), joint="curve")
        for x, y in (points[0], points[-1]):
            draw.ellipse((x - width / 2, y - width / 2, x + width / 2, y + width / 2), fill=INK)
    return big.resize((PAD, PAD), Image.Resampling.BOX)


def data_url(image: Image.Image) -> str:
    """What the page sends: the pad as a PNG data URL (``canvas.toDataURL("image/png")``)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def draw(label: int, rng: np.random.Generator) -> Drawing:
    """One drawing of ``label`` in a random style, size, place, slant and thickness."""
    styles = TEMPLATES[label]
    style = int(rng.integers(len(styles)))
    paths, height, slant = place(styles[style], rng)
    thickness = min(float(rng.uniform(*THICKNESS)), MAX_THICKNESS_RATIO * height)
    return Drawing(label, style, thickness, height, slant, data_url(render(paths, thickness, rng)))


def drawings(per_digit: int = PER_DIGIT, seed: int = SEED) -> list[Drawing]:
    """``per_digit`` drawings of each digit, 0 to 9 in turn, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    return [draw(label, rng) for _ in range(per_digit) for label in range(10)]


def as_sent(drawing: Drawing) -> dict:
    """The payload the worker gets for a drawing: the web side's 64x64 ``pixels`` grid."""
    return images.reduce_to_pixels(images.decode_data_url("image", drawing.url))


def grids(made: list[Drawing]) -> tuple[np.ndarray, np.ndarray]:
    """Drawings as the model sees them: inputs (n, 8, 8, 1) and labels (n,)."""
    x = np.stack([inputs.digits_input(as_sent(d)) for d in made])[..., None]
    return x.astype(np.float32), np.array([d.label for d in made], dtype=np.int64)


def test_set(per_digit: int = PER_DIGIT, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """The drawn test set as the model sees it: inputs (n, 8, 8, 1) and labels (n,)."""
    return grids(drawings(per_digit, seed))
