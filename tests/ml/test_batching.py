"""The micro-batcher with real threads: concurrent callers share forward passes, each gets
its own row back, errors reach every caller of the failed batch and nobody else."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from ml.batching import MicroBatcher


class CountingModel:
    """A stand-in forward pass that doubles its input and counts how often it ran."""

    def __init__(self, fail_when=None) -> None:
        self.calls: list[int] = []
        self.fail_when = fail_when
        self.lock = threading.Lock()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with self.lock:
            self.calls.append(len(batch))
        if self.fail_when is not None and self.fail_when(batch):
            raise ValueError("the model choked on this batch")
        return batch * 2.0


def run_clients(batcher: MicroBatcher, clients: int, per_client: int) -> dict[tuple[int, int], np.ndarray]:
    start = threading.Barrier(clients)

    def client(c: int) -> dict:
        start.wait()
        return {(c, i): batcher.submit(np.full((3,), c * 1000 + i, np.float32)) for i in range(per_client)}

    with ThreadPoolExecutor(clients) as pool:
        results: dict = {}
        for part in pool.map(client, range(clients)):
            results.update(part)
    return results


def test_concurrent_requests_share_forward_passes_and_each_gets_its_own_row():
    model = CountingModel()
    batcher = MicroBatcher(model, max_size=16, window_ms=20, name="test")
    results = run_clients(batcher, clients=32, per_client=10)
    batcher.close()
    assert len(results) == 320
    for (c, i), row in results.items():
        assert np.array_equal(row, np.full((3,), 2.0 * (c * 1000 + i)))
    assert sum(model.calls) == 320 and batcher.stats.items == 320
    assert max(model.calls) <= 16  # never more than max_size in one pass
    assert len(model.calls) <= 320 / 4, model.calls  # far fewer passes than requests


def test_a_lone_caller_runs_in_batches_of_one():
    model = CountingModel()
    batcher = MicroBatcher(model, max_size=64, window_ms=5)
    for i in range(5):
        assert batcher.submit(np.array([i], np.float32))[0] == 2 * i
    batcher.close()
    assert model.calls == [1, 1, 1, 1, 1]


def test_a_failing_batch_fails_its_callers_and_the_batcher_carries_on():
    model = CountingModel(fail_when=lambda batch: (batch < 0).any())
    batcher = MicroBatcher(model, max_size=8, window_ms=1)
    with pytest.raises(ValueError, match="choked"):
        batcher.submit(np.array([-1.0], np.float32))
    assert batcher.submit(np.array([4.0], np.float32))[0] == 8.0
    batcher.close()


def test_it_refuses_nonsense_settings():
    with pytest.raises(ValueError, match="max_size must be >= 1"):
        MicroBatcher(CountingModel(), max_size=0)
