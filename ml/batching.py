"""Micro-batching: concurrent requests for one model run as one forward pass.

Caller threads ``submit`` an input and block on their slot; one batcher thread per model
takes whatever is waiting (up to ``max_size``), waits up to ``window_ms`` for the callers
it expects, runs ``fn`` on the stacked batch once and hands each caller its row.
No Celery, no TensorFlow: ``fn`` is any callable from an (n, ...) array to an (n, ...) array.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: Defaults; the worker passes settings.BATCH_MAX_SIZE / BATCH_WINDOW_MS.
DEFAULT_MAX_SIZE = 64
DEFAULT_WINDOW_MS = 5.0
#: How long a caller waits for its row before giving up (a stuck forward pass, not a slow one).
RESULT_TIMEOUT_S = 120.0

_STOP = object()
#: Called as ``observe(name, size)`` after every forward pass (the worker's metrics add one);
#: an observer that raises is logged, never seen by callers.
BATCH_OBSERVERS: list[Callable[[str, int], None]] = []


class _Slot:
    """One caller's input and, once the batch ran, its output (a lock as the cheapest event)."""

    __slots__ = ("item", "result", "error", "done")

    def __init__(self, item: np.ndarray) -> None:
        self.item = item
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = threading.Lock()
        self.done.acquire()

    def resolve(self, result: Any = None, error: BaseException | None = None) -> None:
        self.result, self.error = result, error
        self.done.release()

    def wait(self, timeout: float) -> Any:
        if not self.done.acquire(timeout=timeout):
            raise TimeoutError(f"no result from the model within {timeout:.0f}s")
        if self.error is not None:
            raise self.error
        return self.result


@dataclass
class BatchStats:
    """Counters for tests and benchmarks: forward passes, items, the largest batch."""

    batches: int = 0
    items: int = 0
    largest: int = 0

    def record(self, size: int) -> None:
        self.batches += 1
        self.items += size
        self.largest = max(self.largest, size)


class MicroBatcher:
    """Runs ``fn`` on batches assembled from concurrent ``submit`` calls."""

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], max_size: int = DEFAULT_MAX_SIZE,
                 window_ms: float = DEFAULT_WINDOW_MS, name: str = "model") -> None:
        if max_size < 1 or window_ms < 0:
            raise ValueError(f"max_size must be >= 1 and window_ms >= 0 (got {max_size}, {window_ms})")
        self.fn, self.max_size, self.window = fn, max_size, window_ms / 1000.0
        self.name = name
        self.stats = BatchStats()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._expected = 1  # callers seen in the last batch: how many are worth waiting for
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    def submit(self, item: np.ndarray, timeout: float = RESULT_TIMEOUT_S) -> Any:
        """Run ``item`` (one input, without the batch axis) in the next batch; returns its output row."""
        slot = _Slot(item)
        self._queue.put(slot)
        return slot.wait(timeout)

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(5)

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            self._run(batch)

    def _collect(self) -> list[_Slot] | None:
        """Block for one slot, take what is waiting, then wait (at most the window) for the
        number of callers the last batch had; a lone caller never waits."""
        first = self._queue.get()
        if first is _STOP:
            return None
        batch, deadline = [first], time.monotonic() + self.window
        target = min(self.max_size, self._expected)
        while len(batch) < self.max_size:
            try:
                timeout = deadline - time.monotonic() if len(batch) < target else 0.0
                slot = self._queue.get(timeout=timeout) if timeout > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if slot is _STOP:
                self._queue.put(_STOP)
                break
            batch.append(slot)
        self._expected = len(batch)
        return batch

    def _run(self, batch: list[_Slot]) -> None:
        try:
            outputs = self.fn(np.stack([slot.item for slot in batch]))
            if len(outputs) != len(batch):
                raise RuntimeError(f"{self.name}: model returned {len(outputs)} rows for {len(batch)} inputs")
        except Exception as exc:  # every caller of this batch gets the error; the batcher lives on
            logger.exception("%s: batch of %d failed", self.name, len(batch))
            for slot in batch:
                slot.resolve(error=exc)
            return
        self.stats.record(len(batch))
        for slot, output in zip(batch, outputs, strict=True):
            slot.resolve(output)
        notify_observers(self.name, len(batch))


def notify_observers(model: str, size: int) -> None:
    """Tell every BATCH_OBSERVERS entry that ``model`` ran a forward pass over ``size`` inputs."""
    for observe in BATCH_OBSERVERS:
        try:
            observe(model, size)
        except Exception:  # noqa: BLE001 - metrics never break serving
            logger.exception("%s: batch observer %r failed", model, observe)
