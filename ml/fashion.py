"""Clothing photos: a CNN on Fashion-MNIST from Debian's dataset-fashion-mnist package.

It knows ten kinds of clothing and nothing else. An uploaded photo is trimmed, scaled so
its longest side is 28, centred and negated: the greyscale image Fashion-MNIST is made of.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import keras
import numpy as np

from ml import artifacts, classifier, datasets, inputs
from ml.errors import ModelUnavailable
from ml.registry import FASHION, FASHION_LABELS
from ml.training import Progress

logger = logging.getLogger(__name__)

NAME = "fashion"
LABELS = FASHION_LABELS
SIDE = 28
#: 8 epochs of 60,000 images: about 90% held-out accuracy in about 2 minutes on 2 CPU cores.
EPOCHS = 8
BATCH_SIZE = 128
SEED = 0


def build() -> keras.Model:
    """conv32 - pool - conv64 - pool, dropout, dense 128: about 0.4 M parameters."""
    return classifier.build_cnn(SIDE, filters=(32, 64), dense=128, dropout=0.3, pool_every=1)


def train(model_dir: Path | str, epochs: int | None = None, *, limit: int | None = None, verbose: int = 0,
          on_progress: Progress | None = None) -> dict[str, Any]:
    """Train on the 60,000 training images, test on the 10,000 held out; save model + card."""
    available, reason = datasets.fashion_available()
    if not available:
        raise ModelUnavailable(NAME, reason)
    keras.utils.set_random_seed(SEED)
    split = classifier.subset(datasets.fashion(), limit)
    return classifier.train_classifier(
        build(), split, name=NAME, model_dir=model_dir, epochs=epochs or EPOCHS, batch_size=BATCH_SIZE,
        verbose=verbose, on_progress=on_progress,
        card_extra={"title": FASHION.title, "data_source": FASHION.data_source, "labels": list(LABELS),
                    "input": "28x28 greyscale, garment light on black (0..1), shape (28, 28, 1)"})


def load(model_dir: Path | str) -> keras.Model:
    return artifacts.load(model_dir, NAME)


def preprocess(payload: Any) -> np.ndarray:
    """A payload as the (28, 28, 1) float32 image the model takes; raises InvalidInput."""
    return inputs.fashion_input(payload)[..., None]


def predict(model: keras.Model, batch: np.ndarray) -> np.ndarray:
    """Probabilities for the ten kinds of clothing, shape (n, 10), in one compiled forward pass."""
    return classifier.predict(model, batch)
