"""What the image classifiers (digits, fashion) share: a small CNN, its training loop with
held-out evaluation and model card, a compiled batch forward pass, and top-k results.
"""
from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from ml import artifacts
from ml.datasets import Split
from ml.training import Progress, callbacks, steps

logger = logging.getLogger(__name__)

#: How many labels a classification result lists, most probable first.
TOP_K = 5
#: Decimal places kept for probabilities and for the "what the model saw" grid.
PROBABILITY_DECIMALS = 4
PIXEL_DECIMALS = 3

_compiled: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def build_cnn(side: int, filters: tuple[int, ...], dense: int, dropout: float, pool_every: int,
              classes: int = 10) -> keras.Model:
    """Conv(3x3) layers (max-pooled after every ``pool_every``), dropout, dense, softmax; compiled."""
    layers: list[keras.layers.Layer] = [keras.Input((side, side, 1))]
    for i, count in enumerate(filters, start=1):
        layers.append(keras.layers.Conv2D(count, 3, padding="same", activation="relu"))
        if i % pool_every == 0:
            layers.append(keras.layers.MaxPooling2D(2))
    layers += [keras.layers.Flatten(), keras.layers.Dropout(dropout),
               keras.layers.Dense(dense, activation="relu"),
               keras.layers.Dense(classes, activation="softmax", dtype="float32")]
    model = keras.Sequential(layers)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def subset(split: Split, limit: int | None) -> Split:
    """The first ``limit`` training and test examples (tests train tiny models in seconds)."""
    if limit is None:
        return split
    return Split(split.x_train[:limit], split.y_train[:limit], split.x_test[:limit], split.y_test[:limit])


def train_classifier(model: keras.Model, split: Split, *, name: str, model_dir: Path | str, epochs: int,
                     batch_size: int, verbose: int, on_progress: Progress | None,
                     card_extra: dict[str, Any],
                     after_fit: Callable[[keras.Model], dict[str, float]] | None = None,
                     started: float | None = None) -> dict[str, Any]:
    """Fit, evaluate on the held-out test set, save model and card; returns the card.

    ``after_fit(model)`` runs between fitting and testing: it may adjust the model (digits
    folds a softmax temperature into it) and returns more metrics for the card. ``started``
    (``time.monotonic()``) counts data preparation into the card's training time.
    """
    started = time.monotonic() if started is None else started
    model.fit(split.x_train, split.y_train, epochs=epochs, batch_size=batch_size, verbose=verbose,
              callbacks=callbacks(on_progress, epochs, steps(len(split.x_train), batch_size)))
    more = after_fit(model) if after_fit else {}
    loss, accuracy = model.evaluate(split.x_test, split.y_test, batch_size=256, verbose=0)
    card = artifacts.make_card(
        name, metrics={"test_accuracy": accuracy, "test_loss": loss, **more}, started=started, epochs=epochs,
        train_examples=len(split.x_train), test_examples=len(split.x_test), **card_extra)
    artifacts.save(model, card, model_dir)
    return card


def forward(model: keras.Model) -> Callable[[np.ndarray], np.ndarray]:
    """The model's inference pass as one compiled tf.function (traced once for any batch size)."""
    fn = _compiled.get(model)
    if fn is None:
        spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
        fn = tf.function(lambda x: model(x, training=False), input_signature=[spec], reduce_retracing=True)
        _compiled[model] = fn
    return lambda batch: fn(tf.convert_to_tensor(batch, dtype=tf.float32)).numpy()


def predict(model: keras.Model, batch: np.ndarray) -> np.ndarray:
    """Class probabilities for a batch shaped (n, side, side, 1)."""
    return forward(model)(batch)


def top(probabilities: np.ndarray, labels: tuple[str, ...], k: int = TOP_K) -> list[dict[str, Any]]:
    """The ``k`` likeliest labels, most probable first, as JSON-safe dicts."""
    order = np.argsort(probabilities)[::-1][:k]
    return [{"label": labels[i], "probability": round(float(probabilities[i]), PROBABILITY_DECIMALS)}
            for i in order]


def seen(x: np.ndarray) -> list[list[float]]:
    """The preprocessed image as rows of 0..1 values: what the model actually looked at."""
    return np.round(x[..., 0], PIXEL_DECIMALS).tolist()
