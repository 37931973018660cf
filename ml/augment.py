"""More training digits from scikit-learn's own: slanted, turned, stretched, bolder or thinner.

People draw on the page at any slant and with a pen far bolder than the UCI scans, so each
8x8 digit is blown up to a smooth 32x32 image, sheared, rotated, stretched, warped a little
(a smoothed random displacement field), made thinner or bolder (a threshold plus a max
filter), then reduced again by exactly the preprocessing a drawing goes through
(``ml.images.digits_grid``: crop, fit the 32-pixel height, centre, 4x4 block counts).
NumPy, SciPy and Pillow only; fixed seeds, so a retrain sees the same images.
"""
from __future__ import annotations

import logging

import numpy as np
from PIL import Image
from scipy import ndimage

from ml.images import digits_grid

logger = logging.getLogger(__name__)

#: Side the 8x8 digit is enlarged to before it is transformed (the UCI bitmaps' 32).
WORK_SIDE = 32
#: Blank margin around the enlarged digit, so a transformed one stays on the image.
MARGIN = 12
#: Shear (horizontal shift per unit of height), both ways: people slant left and right.
SHEAR = (-0.45, 0.5)
#: Rotation in degrees.
ROTATION = (-15.0, 15.0)
#: Width relative to height.
STRETCH = (0.7, 1.35)
#: Threshold on the smooth enlarged digit: lower makes the strokes bolder.
THRESHOLD = (0.25, 0.6)
#: Side of the max filter that makes strokes bolder (1 = none), on the 32-pixel digit.
BOLDEN = (1, 1, 2, 3, 4, 5)
#: Random displacement field: strength (pixels) and smoothness (sigma, pixels).
WARP = (1.2, 3.0)


def enlarge(grid: np.ndarray) -> np.ndarray:
    """An 8x8 digit (0..1) as a smooth WORK_SIDE image on a blank margin."""
    image = Image.fromarray(grid.astype(np.float32), mode="F").resize((WORK_SIDE, WORK_SIDE),
                                                                      Image.Resampling.BICUBIC)
    return np.pad(np.clip(np.asarray(image), 0.0, 1.0), MARGIN)


def affine(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Shear, rotate and stretch about the image centre (bilinear)."""
    shear, stretch = rng.uniform(*SHEAR), rng.uniform(*STRETCH)
    angle = np.radians(rng.uniform(*ROTATION))
    rotate = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    forward = rotate @ np.array([[stretch, 0.0], [0.0, 1.0]])
    forward = forward @ np.array([[1.0, 0.0], [-shear, 1.0]]).T  # x' = x - shear * y (top leans right)
    inverse = np.linalg.inv(forward)
    centre = np.array(image.shape) / 2.0
    # ndimage works in (row, column): swap the axes of the (x, y) matrix.
    matrix = inverse[::-1, ::-1]
    return ndimage.affine_transform(image, matrix, offset=centre - matrix @ centre, order=1)


def warp(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A small elastic distortion: a random displacement field, smoothed."""
    strength, sigma = WARP
    field = [ndimage.gaussian_filter(rng.uniform(-1, 1, image.shape), sigma) for _ in range(2)]
    field = [f * (strength / max(np.abs(f).max(), 1e-6)) for f in field]
    rows, cols = np.meshgrid(np.arange(image.shape[0]), np.arange(image.shape[1]), indexing="ij")
    return ndimage.map_coordinates(image, [rows + field[0], cols + field[1]], order=1)


def stroke(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Thinner or bolder strokes with soft edges: threshold, max filter, a little blur."""
    ink = (image > rng.uniform(*THRESHOLD) * image.max()).astype(np.float32)
    size = int(rng.choice(BOLDEN))
    if size > 1:
        ink = ndimage.maximum_filter(ink, size=size)
    return ndimage.uniform_filter(ink, size=2)


def augment_one(grid: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One random variation of an 8x8 digit, as the 8x8 grid the model sees."""
    image = stroke(warp(affine(enlarge(grid), rng), rng), rng)
    if image.max() < 0.5:  # thresholded away entirely (a faint digit): keep it as it was
        image = enlarge(grid)
    return digits_grid("augment", image)


def augment(x: np.ndarray, y: np.ndarray, copies: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``copies`` random variations of every digit in ``x`` (n, 8, 8, 1), with their labels."""
    rng = np.random.default_rng(seed)
    grids = [augment_one(grid, rng) for _ in range(copies) for grid in x[..., 0]]
    return np.stack(grids)[..., None].astype(np.float32), np.tile(y, copies)
