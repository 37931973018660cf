"""Pen-stroke digits for training: the styles people draw with a mouse that the UCI scans lack.

scikit-learn's digits come from 43 writers with a pen on paper; on the page people draw
plain sticks for 1, 7s with bars, 2s with a loop, open 4s, at any slant and pen width.
Each style here is a few key points per stroke on a 6 x 10 grid (y down), smoothed by
Chaikin corner cutting except at marked corners, jittered point by point, slanted, turned
and stretched, then drawn straight onto a small bitmap at a random pen width and reduced
by the model's own preprocessing (``ml.images.digits_grid``).

This generator and its templates are separate from ``ml.drawn`` (the drawn test set: other
templates, drawn on the page's 280-pixel pad and sent through the web side's reduction), so
accuracy on that set is measured on drawings the model never saw the like of in training.
"""
from __future__ import annotations

import logging

import numpy as np
from PIL import Image, ImageDraw

from ml.images import digits_grid

logger = logging.getLogger(__name__)

#: Side of the bitmap a digit is drawn on, and the digit's height on it (pixels).
CANVAS, HEIGHT = 48, 28.0
#: Key point jitter (grid units; the digit is 10 high).
JITTER = 0.3
#: How far the middle of each stroke segment bows out sideways (grid units, either way):
#: hands draw straight lines bent.
BEND = 1.0
#: Shear, rotation (degrees), width stretch, pen width (pixels on the 28-pixel digit).
SHEAR, ROTATION, STRETCH, PEN = (-0.45, 0.5), (-14.0, 14.0), (0.7, 1.35), (1.0, 6.5)
#: Rounds of Chaikin corner cutting.
SMOOTHING = 3

C = 1  # marks a hard corner: (x, y, C)

#: Styles per digit: strokes of key points (x, y) or corners (x, y, C) on a 6 x 10 grid.
STYLES: dict[int, list[list[list[tuple]]]] = {
    0: [[[(3, 0), (0.6, 1.8), (0, 5), (0.6, 8.2), (3, 10), (5.4, 8.2), (6, 5), (5.4, 1.8), (3, 0)]],
        [[(3.5, 0.2), (1.4, 1), (0.6, 5), (1.4, 9), (3, 10), (4.6, 9), (5.3, 5), (4.6, 1), (2.8, 0.4)]]],
    1: [[[(3, 0), (3, 10)]],
        [[(1.4, 2.2, C), (3.2, 0, C), (3.2, 10)]],
        [[(1.5, 2, C), (3, 0, C), (3, 10)], [(1, 10), (5, 10)]]],
    2: [[[(0.5, 2.5), (2, 0.2), (4.5, 0.3), (5.8, 2.5), (4.5, 5.5), (0.2, 10, C), (6, 10)]],
        [[(0.5, 2.5), (2.2, 0.2), (4.6, 0.5), (5.6, 2.6), (4.2, 5.6), (1.0, 9.0), (1.9, 8.4), (2.2, 9.4),
          (1.0, 10, C), (6, 10)]],
        [[(0.3, 1.5), (3, 0), (5.6, 1.5), (5, 4), (0.2, 10, C), (6, 9.8)]]],
    3: [[[(0.5, 1.2), (2.5, 0), (5, 0.8), (5.2, 2.8), (3.8, 4.6), (2, 4.9, C), (4, 5), (5.8, 6.8),
          (5.4, 9), (3, 10), (0.3, 8.8)]],
        [[(0.3, 0, C), (5.5, 0, C), (2.5, 4.2, C), (4.5, 4.6), (5.9, 7), (4.8, 9.5), (2.5, 10), (0.2, 8.8)]]],
    4: [[[(4.5, 0, C), (0, 6.5, C), (6, 6.5)], [(4.6, 2.5), (4.6, 10)]],
        [[(4.6, 10, C), (4.6, 0, C), (0, 6.7, C), (6, 6.7)]],
        [[(0.8, 0, C), (0.4, 6, C), (6, 6)], [(4.5, 0.5), (4.5, 10)]]],
    5: [[[(5.6, 0, C), (1, 0, C), (0.6, 4.4, C), (2.5, 3.6), (5, 4), (6, 6.6), (5, 9.2), (2.6, 10), (0.3, 9)]],
        [[(1, 0, C), (0.6, 4.4, C), (2.5, 3.6), (5, 4), (6, 6.6), (5, 9.2), (2.6, 10), (0.3, 9)],
         [(1, 0), (5.6, 0)]]],
    6: [[[(5, 0.3), (2.5, 1.5), (0.6, 4.5), (0.3, 7.5), (1.8, 9.8), (4.3, 9.8), (5.7, 7.8), (4.5, 5.5),
          (2.3, 5.4), (0.5, 7)]],
        [[(4.5, 0), (1, 5), (0.4, 7.5), (1.8, 9.8), (4.4, 9.8), (5.6, 7.5), (4, 5.4), (1.8, 5.8), (0.5, 7.5)]]],
    7: [[[(0.3, 0.2, C), (5.8, 0.2, C), (2, 10)]],
        [[(0.3, 0.2, C), (5.8, 0.2, C), (2, 10)], [(1.2, 5), (4.8, 5)]],
        [[(0.3, 0.2, C), (5.8, 0.2, C), (4, 3.5), (2.8, 6.5), (2.4, 10)]],
        [[(0.2, 1.5, C), (0.4, 0.1, C), (5.8, 0.2, C), (2.2, 10)]]],
    8: [[[(5, 1.5), (3, 0), (0.9, 1.3), (1.2, 3.5), (3, 5), (5.2, 6.8), (5, 9.3), (3, 10), (0.8, 9.3),
          (0.7, 6.8), (3, 5), (4.9, 3.4), (5.2, 1.6)]],
        [[(3, 0), (1, 1.2), (1, 3.6), (3, 4.9), (5, 3.6), (5, 1.2), (3, 0)],
         [(3, 4.9), (0.4, 6.3), (0.5, 9), (3, 10), (5.5, 9), (5.6, 6.3), (3, 4.9)]]],
    9: [[[(5.5, 2.5), (3, 0), (0.5, 1), (0.3, 3.5), (2.3, 5.2), (4.8, 4.5), (5.6, 2.5, C), (5.5, 6), (5, 10)]],
        [[(5.5, 2.5), (3, 0), (0.5, 1), (0.3, 3.5), (2.3, 5.2), (4.8, 4.5), (5.6, 2.5, C), (5.6, 6), (4.5, 9),
          (2, 10), (0.5, 9)]]],
}


def chaikin(points: np.ndarray, corners: np.ndarray, rounds: int = SMOOTHING) -> np.ndarray:
    """Smooth a polyline by corner cutting, keeping its ends and the marked corners."""
    cuts = [0, *np.flatnonzero(corners[1:-1]) + 1, len(points) - 1]
    runs = []
    for start, end in zip(cuts[:-1], cuts[1:], strict=True):
        run = points[start:end + 1]
        for _ in range(rounds):
            near, far = 0.75 * run[:-1] + 0.25 * run[1:], 0.25 * run[:-1] + 0.75 * run[1:]
            run = np.concatenate([run[:1], np.stack([near, far], axis=1).reshape(-1, 2), run[-1:]])
        runs.append(run if not runs else run[1:])
    return np.concatenate(runs)


def bend(points: np.ndarray, corners: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A bowed midpoint in every segment: straight strokes come out curved one way or the other."""
    a, b = points[:-1], points[1:]
    along = b - a
    length = np.linalg.norm(along, axis=1)[:, None]
    normal = np.stack([-along[:, 1], along[:, 0]], axis=1) / np.maximum(length, 1e-6)
    # Short segments bow less: a full BEND only for segments 4 units or longer.
    middle = (a + b) / 2 + normal * rng.uniform(-BEND, BEND, (len(a), 1)) * np.minimum(length, 4) / 4
    merged = np.empty((2 * len(points) - 1, 2))
    merged[0::2], merged[1::2] = points, middle
    flags = np.zeros(len(merged), dtype=bool)
    flags[0::2] = corners
    return merged, flags


def shape(stroke: list[tuple], rng: np.random.Generator) -> np.ndarray:
    """One stroke's key points, jittered and bent, then smoothed."""
    points = np.array([p[:2] for p in stroke], dtype=float) + rng.normal(0, JITTER, (len(stroke), 2))
    corners = np.array([len(p) > 2 for p in stroke])
    return chaikin(*bend(points, corners, rng))


def transform(paths: list[np.ndarray], rng: np.random.Generator) -> list[np.ndarray]:
    """Slant, turn and stretch about the centre, scaled to HEIGHT pixels, centred on the canvas."""
    shear, angle, stretch = rng.uniform(*SHEAR), np.radians(rng.uniform(*ROTATION)), rng.uniform(*STRETCH)
    matrix = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ \
        np.array([[stretch, -shear * stretch], [0.0, 1.0]])
    scale = HEIGHT / 10.0
    return [((path - (3.0, 5.0)) @ matrix.T) * scale + CANVAS / 2 for path in paths]


def draw_one(label: int, rng: np.random.Generator) -> np.ndarray:
    """One pen-stroke digit as the 8x8 grid the model sees."""
    styles = STYLES[label]
    strokes = styles[int(rng.integers(len(styles)))]
    paths = transform([shape(stroke, rng) for stroke in strokes], rng)
    pen = rng.uniform(*PEN)
    image = Image.new("L", (CANVAS, CANVAS), 0)
    draw = ImageDraw.Draw(image)
    for path in paths:
        points = [tuple(p) for p in path.tolist()]
        draw.line(points, fill=255, width=max(1, round(pen)), joint="curve")
        for x, y in (points[0], points[-1]):
            draw.ellipse((x - pen / 2, y - pen / 2, x + pen / 2, y + pen / 2), fill=255)
    return digits_grid("strokes", np.asarray(image, dtype=np.float32) / 255.0)


def make(per_digit: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``per_digit`` stroke digits of each class: inputs (n, 8, 8, 1) and labels (n,)."""
    rng = np.random.default_rng(seed)
    labels = np.tile(np.arange(10), per_digit)
    grids = [draw_one(int(label), rng) for label in labels]
    return np.stack(grids)[..., None].astype(np.float32), labels.astype(np.int64)
