"""Training progress as data and as one line of text, without TensorFlow.

A training task's PROGRESS meta is ``{"stage", "epoch", "epochs", "metrics", "elapsed_seconds",
"eta_seconds"}`` (``stage`` "waiting" while another model trains first, with ``behind``).
The web pages, ``manage.py train_models`` and ``manage.py dev`` show the same numbers;
:func:`describe` is the one way Python code turns them into words.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

#: A progress hook: (percent 0..100, details) -> None; raising stops the work.
Progress = Callable[[float, dict[str, Any]], None]
#: Metrics shown as percentages (Keras names them this way); others are shown as numbers.
PERCENT_METRICS = ("accuracy", "val_accuracy", "test_accuracy", "drawn_accuracy", "drawn_ece", "drawn_ece_unscaled")
#: Stage names in the meta.
WAITING, TRAINING = "waiting", "training"


def training_meta(epoch: int, epochs: int, elapsed: float, eta_seconds: float | None,
                  metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """The PROGRESS meta of a training at ``epoch`` of ``epochs``, ``elapsed`` seconds in."""
    meta: dict[str, Any] = {"stage": TRAINING, "epoch": epoch, "epochs": epochs,
                            "elapsed_seconds": round(elapsed, 1), "eta_seconds": eta_seconds}
    if metrics:
        meta["metrics"] = {key: round(float(value), 4) for key, value in metrics.items()}
    return meta


def eta(fraction: float, seconds: float, since_fraction: float = 0.0) -> float | None:
    """Seconds left at the pace of the last ``seconds``, in which the work went from
    ``since_fraction`` to ``fraction`` (0..1) done; None before there is a pace."""
    if fraction <= since_fraction:
        return None
    pace = seconds / (fraction - since_fraction)
    return round(max(0.0, pace * (1.0 - min(fraction, 1.0))), 1)


def duration(seconds: float | None) -> str:
    """``8 s``, ``3 min``, ``1 h 5 min``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    seconds = max(0, round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def describe(meta: dict[str, Any] | None) -> str:
    """One line: ``epoch 3 of 30 · loss 0.2134 · accuracy 93.1% · about 8 s left``."""
    meta = meta or {}
    if meta.get("stage") == WAITING:
        return f"waiting for {meta.get('behind') or 'another model'} to finish training"
    if "epoch" not in meta:
        return "starting: loading the data and building the network"
    parts = [f"epoch {meta['epoch']} of {meta.get('epochs', '?')}"]
    for key, value in (meta.get("metrics") or {}).items():
        parts.append(f"{key} {100 * value:.1f}%" if key in PERCENT_METRICS else f"{key} {value:.4f}")
    if meta.get("eta_seconds") is not None:
        parts.append(f"about {duration(meta['eta_seconds'])} left")
    return " · ".join(parts)
