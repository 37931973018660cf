"""Shared training plumbing: progress reports (and with them cancellation) during ``fit``.

A progress callback ``on_progress(percent, meta)`` is called at every epoch end and every
few seconds inside an epoch, with the epoch, the running loss/accuracy and the time left
(``ml.progress.training_meta``); it may raise ``ml.errors.Cancelled`` to stop within one step.
"""
from __future__ import annotations

import logging
import time

import keras

from ml.progress import Progress, eta, training_meta

logger = logging.getLogger(__name__)

__all__ = ["MID_EPOCH_REPORT_SECONDS", "Progress", "ProgressCallback", "callbacks", "steps"]

#: Seconds between mid-epoch progress reports (each one is also a cancellation check).
MID_EPOCH_REPORT_SECONDS = 2.0


class ProgressCallback(keras.callbacks.Callback):
    """Reports percent done, metrics and time left to ``on_progress`` per epoch and every few seconds."""

    def __init__(self, on_progress: Progress, epochs: int, steps_per_epoch: int) -> None:
        super().__init__()
        self.on_progress = on_progress
        self.epochs = epochs
        self.steps = max(steps_per_epoch, 1)
        self.epoch = 0
        self.started = self.last_report = time.monotonic()
        # (time, fraction) after the first step: the pace behind "time left" leaves out the
        # start-up and graph tracing, which would make the first estimates far too long.
        self.pace_from: tuple[float, float] | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.started = self.last_report = time.monotonic()
        self.pace_from = None

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        fraction = (self.epoch + (batch + 1) / self.steps) / self.epochs
        if self.pace_from is None:
            self.pace_from = (time.monotonic(), fraction)
        epoch_done = batch + 1 >= self.steps  # on_epoch_end reports it next: reported once, not twice
        if not epoch_done and time.monotonic() - self.last_report >= MID_EPOCH_REPORT_SECONDS:
            self._report(self.epoch + 1, fraction, logs)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._report(epoch + 1, (epoch + 1) / self.epochs, logs)

    def _report(self, epoch: int, fraction: float, logs: dict | None) -> None:
        now = self.last_report = time.monotonic()
        since, since_fraction = self.pace_from or (now, fraction)
        meta = training_meta(epoch, self.epochs, now - self.started, eta(fraction, now - since, since_fraction),
                             dict(logs or {}))
        self.on_progress(round(100.0 * min(fraction, 1.0), 1), meta)


def callbacks(on_progress: Progress | None, epochs: int, steps_per_epoch: int) -> list[keras.callbacks.Callback]:
    """The callbacks ``fit`` needs for a given progress hook (none without one)."""
    return [ProgressCallback(on_progress, epochs, steps_per_epoch)] if on_progress else []


def steps(examples: int, batch_size: int) -> int:
    return -(-examples // batch_size)
