"""Hypothesis strategies for images a hostile or careless client sends: real images in every mode
and format, the same images truncated or with bytes overwritten, noise behind a real signature,
decompression bombs (tiny files that decode to hundreds of millions of pixels) and data URLs."""
from __future__ import annotations

import base64
import functools
import io
import logging
import struct
import zlib

from hypothesis import strategies as st
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: File signatures of the formats the site reads (and a few it must not parse).
SIGNATURES = (PNG_SIGNATURE, b"\xff\xd8\xff\xe0", b"GIF89a", b"GIF87a", b"RIFF\x00\x00\x00\x00WEBPVP8 ",
              b"BM", b"II*\x00", b"%!PS-Adobe-3.0 EPSF-3.0\n", b"8BPS")
#: Side of the 1-bit PNG bomb: 400 M pixels (over Pillow's own 179 M refusal) in about 50 KB.
BOMB_SIDE = 20_000
#: Side of an image over the site's 16.7 M pixel limit yet under Pillow's warning threshold.
OVER_LIMIT_SIDE = 5_000
IMAGE_MODES = ("1", "L", "P", "RGB", "RGBA", "LA", "PA", "I", "I;16", "F", "CMYK")
#: Formats Pillow writes each mode in (the site reads PNG, JPEG, WebP and GIF; BMP and TIFF it must refuse).
SAVE_FORMATS = {"1": ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"), "L": ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"),
                "P": ("PNG", "GIF", "WEBP", "BMP"), "RGB": ("PNG", "JPEG", "GIF", "WEBP", "BMP"),
                "RGBA": ("PNG", "GIF", "WEBP", "TIFF"), "LA": ("PNG", "GIF", "WEBP"), "PA": ("WEBP", "TIFF"),
                "I": ("GIF", "WEBP", "TIFF"), "I;16": ("PNG", "GIF", "TIFF"), "F": ("GIF", "TIFF"),
                "CMYK": ("JPEG", "WEBP", "TIFF")}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@functools.lru_cache(maxsize=4)
def blank_png(side: int, bit_depth: int = 1) -> bytes:
    """A valid greyscale PNG of side x side zero pixels, built row by row (never held decoded)."""
    row = b"\x00" * (1 + (side * bit_depth + 7) // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, bit_depth, 0, 0, 0, 0)
    return PNG_SIGNATURE + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


@functools.lru_cache(maxsize=1)
def gif_bomb() -> bytes:
    """A 1x1 GIF whose screen and frame claim 65535x65535 pixels."""
    raw = bytearray(encode(Image.new("P", (1, 1)), "GIF"))
    raw[6:10] = struct.pack("<HH", 65535, 65535)
    frame = raw.index(b",")  # the image descriptor: left, top, width, height
    raw[frame + 5:frame + 9] = struct.pack("<HH", 65535, 65535)
    return bytes(raw)


@functools.lru_cache(maxsize=1)
def jpeg_bomb() -> bytes:
    """A tiny JPEG whose frame header claims 65000x65000 pixels."""
    raw = bytearray(encode(Image.new("L", (8, 8), 128), "JPEG"))
    sof = raw.index(b"\xff\xc0")
    raw[sof + 5:sof + 9] = struct.pack(">HH", 65000, 65000)
    return bytes(raw)


def bombs() -> dict[str, bytes]:
    """Small files that decode to far more pixels than the site allows."""
    return {"png 20000x20000 1-bit": blank_png(BOMB_SIDE), "gif 65535x65535": gif_bomb(),
            "jpeg 65000x65000": jpeg_bomb(), "png 5000x5000 (over the site limit)": blank_png(OVER_LIMIT_SIDE)}


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def data_url(raw: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64,{base64.b64encode(raw).decode()}"


@st.composite
def real_images(draw, max_side: int = 64) -> bytes:
    """A real encoded image: any mode and format Pillow writes, blank or with a stroke."""
    mode = draw(st.sampled_from(IMAGE_MODES))
    fmt = draw(st.sampled_from(SAVE_FORMATS[mode]))
    size = (draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    image = Image.new(mode, size)
    if draw(st.booleans()):
        box = [draw(st.integers(0, size[0])), draw(st.integers(0, size[1]))]
        ImageDraw.Draw(image).rectangle([0, 0, *box], fill=draw(st.integers(0, 255)))
    return encode(image, fmt)


@st.composite
def truncated_images(draw) -> bytes:
    """A real image cut to at most half its length: the header may parse, the pixels are gone."""
    raw = draw(real_images())
    return raw[:draw(st.integers(0, len(raw) // 2))]


@st.composite
def corrupted_images(draw) -> bytes:
    """A real image with a few bytes overwritten (header, palette, compressed data...)."""
    raw = bytearray(draw(real_images()))
    for _ in range(draw(st.integers(1, 8))):
        raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw)


@st.composite
def noise_behind_a_signature(draw) -> bytes:
    return draw(st.sampled_from(SIGNATURES)) + draw(st.binary(max_size=300))


def broken_images() -> st.SearchStrategy[bytes]:
    """Bytes that are no whole image: truncated, noise (with or without a signature), bombs."""
    return st.one_of(truncated_images(), noise_behind_a_signature(), st.binary(max_size=200),
                     st.sampled_from(sorted(bombs())).map(lambda name: bombs()[name]))


def any_images() -> st.SearchStrategy[bytes]:
    """Readable images and broken ones alike."""
    return st.one_of(real_images(), corrupted_images(), broken_images())
