"""Image decoding and normalisation with Pillow and NumPy only (no TensorFlow).

Turns a browser drawing or an uploaded photo into what a model was trained on: the 8x8
block counts of scikit-learn's digits, or Fashion-MNIST's centred 28x28 negated greyscale.
"""
from __future__ import annotations

import base64
import binascii
import io
import logging
import re
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ml.errors import InvalidInput

logger = logging.getLogger(__name__)

#: Longest data URL accepted: the job travels through etcd, whose request limit is 1.5 MiB.
MAX_DATA_URL_CHARS = 1_000_000
#: Largest decoded image (width * height); refuses decompression bombs before decoding.
MAX_IMAGE_PIXELS = 4096 * 4096
#: Image types a data URL may carry.
IMAGE_TYPES = ("png", "jpeg", "jpg", "webp", "gif")
#: The only decoders Pillow may use on client bytes (EPS would start Ghostscript, and other
#: formats' parsers are attack surface nobody asked for).
PILLOW_FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
#: Side of the bitmap the UCI digits were drawn on before 4x4 block counting.
DIGITS_BITMAP = 32
#: Side of the digits grid the model sees (DIGITS_BITMAP / 4).
DIGITS_SIDE = 8
#: Side of a Fashion-MNIST image.
FASHION_SIDE = 28
#: Ink (0..1) above the background that counts as part of the drawing or garment.
FOREGROUND_THRESHOLD = 0.12
#: Side a photo is shrunk to when the web side re-encodes an upload (fits the etcd limit).
UPLOAD_MAX_SIDE = 512
#: Longest side of the greyscale grid the web side reduces an image to before it is queued. The
#: models use 8x8 (digits) and 28x28 (fashion) after cropping, so 64 keeps every detail they can see.
REDUCED_SIDE = 64
#: Shortest side of an image or ``pixels`` grid the models' checks accept.
MIN_SIDE = 8

_DATA_URL = re.compile(r"^data:image/([a-z+]+);base64,", re.IGNORECASE)


def decode_data_url(field: str, url: str) -> Image.Image:
    """Decode a ``data:image/...;base64,`` URL into a greyscale image (alpha over white)."""
    if not isinstance(url, str):
        raise InvalidInput(field, f"must be a data URL string, got {type(url).__name__}")
    if len(url) > MAX_DATA_URL_CHARS:
        raise InvalidInput(field, f"data URL is {len(url):,} characters; the limit is {MAX_DATA_URL_CHARS:,}"
                                  f" (shrink the image to at most {UPLOAD_MAX_SIDE} px a side)")
    match = _DATA_URL.match(url)
    if not match or match.group(1).lower() not in IMAGE_TYPES:
        raise InvalidInput(field, "must be a data URL like 'data:image/png;base64,...' "
                                  f"(types: {', '.join(IMAGE_TYPES)})")
    try:
        raw = base64.b64decode(url[match.end():], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(field, "the base64 part of the data URL is not valid base64") from None
    return open_image(field, raw)


def open_image(field: str, raw: bytes) -> Image.Image:
    """Open encoded image bytes, refusing huge or broken files; returns mode "L"."""
    try:
        image = Image.open(io.BytesIO(raw), formats=PILLOW_FORMATS)
        width, height = image.size
        if width * height > MAX_IMAGE_PIXELS:
            raise InvalidInput(field, f"image is {width}x{height}; the limit is {MAX_IMAGE_PIXELS:,} pixels")
        image.load()
    except Image.DecompressionBombError:  # far over our limit: Pillow refused it in open(), before our check
        raise InvalidInput(field, f"image has more pixels than the limit of {MAX_IMAGE_PIXELS:,}") from None
    except (UnidentifiedImageError, OSError, SyntaxError):
        raise InvalidInput(field, "is not a readable PNG, JPEG, WebP or GIF image") from None
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    return image.convert("L")


def image_to_data_url(raw: bytes, max_side: int = UPLOAD_MAX_SIDE) -> str:
    """Re-encode an uploaded photo as a PNG data URL no larger than ``max_side`` a side."""
    image = open_image("image", raw)
    image.thumbnail((max_side, max_side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def reduced_size(width: int, height: int) -> tuple[int, int]:
    """At most REDUCED_SIDE a side with the aspect kept, but no side under MIN_SIDE
    (a long thin image is stretched rather than refused for a size the client never sent)."""
    scale = min(1.0, REDUCED_SIDE / max(width, height))
    return max(min(MIN_SIDE, width), round(width * scale)), max(min(MIN_SIDE, height), round(height * scale))


def reduce_to_pixels(image: Image.Image) -> dict[str, Any]:
    """A decoded image as the ``{"pixels": [...], "width": w}`` payload the web side queues:
    greyscale, 1 = dark, at most REDUCED_SIDE a side, 3 decimals."""
    image = image.resize(reduced_size(image.width, image.height), Image.Resampling.BOX)
    ink = 1.0 - grey_array(image)
    return {"pixels": [round(float(v), 3) for v in ink.ravel()], "width": int(ink.shape[1])}


def grey_array(image: Image.Image) -> np.ndarray:
    """A mode "L" image as float32 in 0..1 (1 = white)."""
    return np.asarray(image, dtype=np.float32) / 255.0


def pixels_array(field: str, pixels: list, width: int | None) -> np.ndarray:
    """A row-major list of floats 0..1 as a 2-D array (square unless ``width`` is given)."""
    try:
        values = np.asarray(pixels, dtype=np.float32)
    except OverflowError:  # an integer beyond any float
        raise InvalidInput(field, "every value must be a number from 0 to 1") from None
    count = values.size
    if width is None:
        width = int(round(count ** 0.5))
    if width <= 0 or count % width:
        raise InvalidInput(field, f"{count} values do not make rows of width {width}; "
                                  "send width*height values, row by row")
    if not np.isfinite(values).all() or values.min() < 0.0 or values.max() > 1.0:
        raise InvalidInput(field, "every value must be a number from 0 to 1")
    return values.reshape(count // width, width)


def border_level(grey: np.ndarray) -> float:
    """Median of the outermost pixels: the background colour of a drawing or product photo."""
    edges = np.concatenate([grey[0], grey[-1], grey[:, 0], grey[:, -1]])
    middle = len(edges) // 2
    return float(np.partition(edges, middle)[middle])  # the (upper) median, without a full sort


def foreground(field: str, grey: np.ndarray, what: str) -> np.ndarray:
    """Distance from the background colour, 0..1; refuses an image with nothing on it."""
    level = border_level(grey)
    scale = level if level > 0.5 else 1.0 - level
    strength = np.abs(grey - level)
    strength *= 1.0 / max(scale, 1e-3)
    np.minimum(strength, 1.0, out=strength)
    if strength.max() < FOREGROUND_THRESHOLD * 2:
        raise InvalidInput(field, f"no {what} found: the image is one flat colour")
    return strength


def crop_to_content(strength: np.ndarray) -> np.ndarray:
    """Trim rows and columns that hold no foreground."""
    mask = strength > FOREGROUND_THRESHOLD
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return strength[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def resize(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """Area-average resample of a 0..1 array (Pillow, float mode)."""
    image = Image.fromarray(array.astype(np.float32), mode="F")
    return np.asarray(image.resize((max(width, 1), max(height, 1)), Image.Resampling.BOX), dtype=np.float32)


def paste_centred(array: np.ndarray, side: int) -> np.ndarray:
    """Place ``array`` (no larger than side x side) in the middle of a black square; an odd
    margin puts the extra pixel above and to the left, as Fashion-MNIST does."""
    canvas = np.zeros((side, side), dtype=np.float32)
    top, left = (side - array.shape[0] + 1) // 2, (side - array.shape[1] + 1) // 2
    canvas[top:top + array.shape[0], left:left + array.shape[1]] = array
    return canvas


def fit_box(height: int, width: int, box: int, by_height: bool) -> tuple[int, int]:
    """(height, width) scaled to fill ``box`` by height (digits) or longest side (fashion)."""
    scale = box / height if by_height else box / max(height, width)
    if width * scale > box:
        scale = box / width
    return max(1, round(height * scale)), max(1, round(width * scale))


def digits_grid(field: str, ink: np.ndarray) -> np.ndarray:
    """A drawing (ink strength 0..1) as scikit-learn's 8x8 digits: values 0..1 (block count / 16).

    As the UCI optdigits set was made: crop to the ink, scale to fill the 32-pixel height
    (narrow digits stay narrow), centre on a 32x32 bitmap, count ink per 4x4 block.
    """
    content = crop_to_content(foreground(field, ink, "drawing"))
    height, width = fit_box(*content.shape, DIGITS_BITMAP, by_height=True)
    bitmap = paste_centred(resize(content, width, height), DIGITS_BITMAP)
    blocks = bitmap.reshape(DIGITS_SIDE, 4, DIGITS_SIDE, 4).sum(axis=(1, 3))
    return (blocks / max(float(blocks.max()), 1e-6)).astype(np.float32)


def fashion_image(field: str, grey: np.ndarray) -> np.ndarray:
    """A product photo as Fashion-MNIST: trimmed, longest side 28, centred, negated, 0..1."""
    content = crop_to_content(foreground(field, grey, "garment"))
    height, width = fit_box(*content.shape, FASHION_SIDE, by_height=False)
    return paste_centred(resize(content, width, height), FASHION_SIDE)
