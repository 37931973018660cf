"""Handwritten digits: a small CNN on scikit-learn's bundled 8x8 digits (no download).

A browser drawing is cropped, scaled to the 32-pixel height, centred and reduced to 4x4
block counts, exactly how the UCI optdigits images behind ``load_digits`` were made.
People draw with a mouse at any slant and with a bolder pen than the UCI writers, so the
training set adds augmented copies (``ml.augment``) and pen-stroke digits (``ml.strokes``);
a softmax temperature fitted on a validation tenth makes the confidence mean something; the
card reports held-out accuracy and accuracy and calibration error on drawn digits
(``ml.drawn``, drawn and sent as the page does, never used in training).
"""
from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
from sklearn.model_selection import train_test_split

from ml import artifacts, augment, calibration, classifier, datasets, drawn, inputs, strokes
from ml.registry import DIGIT_LABELS, DIGITS
from ml.training import Progress

logger = logging.getLogger(__name__)

NAME = "digits"
LABELS = DIGIT_LABELS
SIDE = 8
#: Epochs over the originals, their augmented copies and the pen-stroke digits (about 21 s of
#: CPU time, data preparation included; 30-35 s of wall time on 2 cores at load average 11-15).
EPOCHS = 10
BATCH_SIZE = 64
#: Augmented copies of every training digit (ml.augment): slant, rotation, stretch, pen width.
COPIES = 3
#: Pen-stroke digits (ml.strokes) per class for training, and for the validation set.
STROKE_DIGITS, STROKE_VALIDATION = 250, 30
#: The same when training on a subset (``limit``: the tests' tiny models).
LIMITED_STROKE_DIGITS, LIMITED_STROKE_VALIDATION = 10, 3
#: Share of the training split kept aside to fit the softmax temperature (never trained on).
VALIDATION_SHARE = 0.1
#: Fixed seed: a retrain gives the same network.
SEED = 0


def build() -> keras.Model:
    """Two 3x3 conv layers, one pooling, dropout, dense: about 0.2 M parameters."""
    return classifier.build_cnn(SIDE, filters=(32, 64), dense=128, dropout=0.3, pool_every=2)


@functools.lru_cache(maxsize=4)
def training_data(limit: int | None) -> tuple[datasets.Split, np.ndarray, np.ndarray]:
    """(the training split with augmented copies, held-out test unchanged; validation x, y).

    Cached: a worker or a test process that trains again reuses the same (seeded) images.
    """
    split = classifier.subset(datasets.digits(), limit)
    x_fit, x_val, y_fit, y_val = train_test_split(split.x_train, split.y_train, test_size=VALIDATION_SHARE,
                                                  random_state=SEED, stratify=split.y_train)
    x_more, y_more = augment.augment(x_fit, y_fit, COPIES, seed=SEED)
    x_pen, y_pen = strokes.make(STROKE_DIGITS if limit is None else LIMITED_STROKE_DIGITS, seed=SEED)
    x_val_more, y_val_more = augment.augment(x_val, y_val, COPIES, seed=SEED + 1)
    x_val_pen, y_val_pen = strokes.make(STROKE_VALIDATION if limit is None else LIMITED_STROKE_VALIDATION,
                                        seed=SEED + 1)
    train = datasets.Split(np.concatenate([x_fit, x_more, x_pen]), np.concatenate([y_fit, y_more, y_pen]),
                           split.x_test, split.y_test)
    return (train, np.concatenate([x_val, x_val_more, x_val_pen]),
            np.concatenate([y_val, y_val_more, y_val_pen]))


@functools.lru_cache(maxsize=1)
def drawn_test_set() -> tuple[np.ndarray, np.ndarray]:
    """``ml.drawn.test_set()``, made once per process (about 2.5 s of CPU)."""
    return drawn.test_set()


def calibrate(model: keras.Model, x_val: np.ndarray, y_val: np.ndarray) -> dict[str, float]:
    """Fit the temperature on the validation images, fold it in; accuracy and ECE on drawn digits."""
    x_drawn, y_drawn = drawn_test_set()
    before = calibration.expected_calibration_error(predict(model, x_drawn), y_drawn)
    temperature = calibration.fit_temperature(calibration.logits(model, x_val), y_val)
    calibration.fold_temperature(model, temperature)
    probabilities = predict(model, x_drawn)
    return {"drawn_accuracy": float(np.mean(probabilities.argmax(axis=1) == y_drawn)),
            "drawn_ece": calibration.expected_calibration_error(probabilities, y_drawn),
            "drawn_ece_unscaled": before, "temperature": temperature}


def train(model_dir: Path | str, epochs: int | None = None, *, limit: int | None = None, verbose: int = 0,
          on_progress: Progress | None = None) -> dict[str, Any]:
    """Train on the 80% split (less a validation tenth) and its augmented copies, fit the
    temperature on the validation tenth, test on the held-out 20% and on drawn digits, save
    ``digits.keras`` + card."""
    started = time.monotonic()
    keras.utils.set_random_seed(SEED)
    split, x_val, y_val = training_data(limit)
    x_drawn, _ = drawn_test_set()
    return classifier.train_classifier(
        build(), split, name=NAME, model_dir=model_dir, epochs=epochs or EPOCHS, batch_size=BATCH_SIZE,
        verbose=verbose, on_progress=on_progress, after_fit=lambda model: calibrate(model, x_val, y_val),
        started=started,
        card_extra={"title": DIGITS.title, "data_source": DIGITS.data_source, "labels": list(LABELS),
                    "input": "8x8 block counts / 16 (0..1), shape (8, 8, 1)",
                    "augmented_copies": COPIES, "validation_examples": len(x_val),
                    "drawn_examples": len(x_drawn)})


def load(model_dir: Path | str) -> keras.Model:
    return artifacts.load(model_dir, NAME)


def preprocess(payload: Any) -> np.ndarray:
    """A payload as the (8, 8, 1) float32 grid the model takes; raises InvalidInput."""
    return inputs.digits_input(payload)[..., None]


def predict(model: keras.Model, batch: np.ndarray) -> np.ndarray:
    """Probabilities for the ten digits, shape (n, 10), through one compiled forward pass."""
    return classifier.predict(model, batch)
