"""Shared training plumbing: progress reports (and with them cancellation) during ``fit``.

A progress callback ``on_progress(percent, meta)`` is called at every epoch end and every
few seconds inside an epoch; it may raise ``ml.errors.Cancelled`` to stop within one step.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import keras

logger = logging.getLogger(__name__)

#: A progress hook: (percent 0..100, details) -> None; raising stops the work.
Progress = Callable[[float, dict[str, Any]], None]
#: Seconds between mid-epoch progress reports (each one is also a cancellation check).
MID_EPOCH_REPORT_SECONDS = 2.0


class ProgressCallback(keras.callbacks.Callback):
    """Reports percent done to ``on_progress`` per epoch and every few seconds in between."""

    def __init__(self, on_progress: Progress, epochs: int, steps_per_epoch: int) -> None:
        super().__init__()
        self.on_progress = on_progress
        self.epochs = epochs
        self.steps = max(steps_per_epoch, 1)
        self.epoch = 0
        self.last_report = time.monotonic()

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if time.monotonic() - self.last_report >= MID_EPOCH_REPORT_SECONDS:
            done = (self.epoch + (batch + 1) / self.steps) / self.epochs
            self._report(done, {"epoch": self.epoch + 1, "epochs": self.epochs})

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        metrics = {key: round(float(value), 4) for key, value in (logs or {}).items()}
        self._report((epoch + 1) / self.epochs, {"epoch": epoch + 1, "epochs": self.epochs, "metrics": metrics})

    def _report(self, fraction: float, meta: dict[str, Any]) -> None:
        self.last_report = time.monotonic()
        self.on_progress(round(100.0 * min(fraction, 1.0), 1), meta)


def callbacks(on_progress: Progress | None, epochs: int, steps_per_epoch: int) -> list[keras.callbacks.Callback]:
    """The callbacks ``fit`` needs for a given progress hook (none without one)."""
    return [ProgressCallback(on_progress, epochs, steps_per_epoch)] if on_progress else []


def steps(examples: int, batch_size: int) -> int:
    return -(-examples // batch_size)
