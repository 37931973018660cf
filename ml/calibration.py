"""Confidence that means something: temperature scaling and expected calibration error.

A classifier's softmax is usually over-confident on input unlike its training data. One
temperature T, fitted on held-out validation data (never the test set) to minimise the
negative log-likelihood of softmax(logits / T), fixes most of it without changing any
answer; it is folded into the last Dense layer (weights and bias / T), so the saved model
needs no extra layer and serving is unchanged. NumPy and SciPy, plus Keras for the folding.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

logger = logging.getLogger(__name__)

#: Confidence bins of the expected calibration error (equal width over 0..1, the usual 15).
ECE_BINS = 15
#: Temperatures searched (log-uniform bounds).
TEMPERATURE_RANGE = (0.05, 20.0)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the labels under softmax(logits / temperature)."""
    scaled = logits / temperature
    scaled = scaled - scaled.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(scaled).sum(axis=1))
    return float(np.mean(log_norm - scaled[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises the validation NLL."""
    low, high = np.log(TEMPERATURE_RANGE)
    best = minimize_scalar(lambda log_t: nll(logits, labels, float(np.exp(log_t))), bounds=(low, high),
                           method="bounded", options={"xatol": 1e-4})
    return float(np.exp(best.x))


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Weighted mean |accuracy - confidence| over equal-width confidence bins (0..1)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            total += inside.sum() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total / len(labels))


def logits(model: Any, x: np.ndarray) -> np.ndarray:
    """Pre-softmax outputs of a model whose last layer is a Dense softmax."""
    import keras

    last = model.layers[-1]
    features = keras.Model(model.inputs, model.layers[-2].output).predict(x, batch_size=512, verbose=0)
    weights, bias = last.get_weights()
    return features @ weights + bias


def fold_temperature(model: Any, temperature: float) -> None:
    """Make the last Dense softmax layer compute softmax(logits / temperature)."""
    last = model.layers[-1]
    last.set_weights([w / temperature for w in last.get_weights()])
