"""Serving inside a worker process: models load lazily once and stay warm, classifiers run
through a per-model micro-batcher, generators stream progress. TensorFlow-free at import;
``jobs/tasks.py`` keeps one ``ModelHost`` per process and the benchmark drives the same code.
"""
from __future__ import annotations

import importlib
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from ml import artifacts, registry
from ml.batching import MicroBatcher, notify_observers
from ml.errors import InvalidInput, ModelUnavailable
from ml.progress import WAITING

if TYPE_CHECKING:
    from ml.progress import Progress

logger = logging.getLogger(__name__)

#: Seconds between "still waiting" reports (and cancellation checks) of a training that waits
#: for another one: models train one at a time per process, so the first one is ready soonest.
TRAIN_WAIT_REPORT_SECONDS = 5.0


@dataclass
class Loaded:
    """A model in memory with its module and, for classifiers, its batcher."""

    spec: registry.ModelSpec
    module: ModuleType
    model: Any
    batcher: MicroBatcher | None = field(default=None, repr=False)


class ModelHost:
    """The models of one worker process, keyed by name, loaded on first use."""

    def __init__(self, model_dir: Path | str, batch_max_size: int = 64, batch_window_ms: float = 5.0,
                 batching: bool = True, chunk_chars: int = 25) -> None:
        self.model_dir = Path(model_dir)
        self.batch_max_size, self.batch_window_ms, self.batching = batch_max_size, batch_window_ms, batching
        self.chunk_chars = chunk_chars  # generated characters per PROGRESS report
        self._models: dict[str, Loaded] = {}
        self._lock = threading.Lock()
        self._turns = threading.Condition()  # one training at a time, first come first served
        self._waiting: deque[object] = deque()  # a token per training waiting for its turn
        self._training: str | None = None  # the model training now, for waiting reports

    def spec(self, name: str) -> registry.ModelSpec:
        if name not in registry.MODELS:
            raise InvalidInput("model", f"unknown model {name!r}; known: {', '.join(registry.MODELS)}")
        return registry.MODELS[name]

    def get(self, name: str) -> Loaded:
        """The loaded model, loading it (once, whichever thread asks first) if needed."""
        loaded = self._models.get(name)
        if loaded is None:
            with self._lock:
                loaded = self._models.get(name) or self._load(self.spec(name))
                self._models[name] = loaded
        return loaded

    def _load(self, spec: registry.ModelSpec) -> Loaded:
        if not spec.is_trained(self.model_dir):
            ok, reason = spec.available()
            raise ModelUnavailable(spec.name, reason if not ok else
                                   f"not trained yet: run `python manage.py train_models --model {spec.name}`")
        from ml import device

        device.configure()
        module = importlib.import_module(spec.module)
        model = module.load(self.model_dir)
        batcher = None
        if spec.kind == "classify" and self.batching:
            batcher = MicroBatcher(lambda batch: module.predict(model, batch), self.batch_max_size,
                                   self.batch_window_ms, name=spec.name)
        logger.info("loaded %s from %s", spec.name, artifacts.model_path(self.model_dir, spec.name))
        return Loaded(spec, module, model, batcher)

    def run(self, name: str, payload: Any, on_progress: Progress | None = None) -> dict[str, Any]:
        """Validate, run and return a JSON-safe result; raises InvalidInput / ModelUnavailable."""
        loaded = self.get(name)
        if loaded.spec.kind == "classify":
            return self.classify(loaded, payload)
        return self.generate(loaded, payload, on_progress)

    def classify_many(self, name: str, payloads: list[Any]) -> list[dict[str, Any] | Exception]:
        """``run(name, payload)`` for each payload of classifier ``name`` in one forward pass; one
        outcome per payload, in order: its result, or the error its input raised (InvalidInput).
        The forward pass runs here, not through the micro-batcher: the batch is already formed."""
        from ml import classifier

        loaded = self.get(name)
        outcomes: list[dict[str, Any] | Exception] = []
        inputs: dict[int, Any] = {}
        for index, payload in enumerate(payloads):
            try:
                inputs[index] = loaded.module.preprocess(payload)
                outcomes.append({})
            except Exception as exc:  # noqa: BLE001 - that payload's outcome (InvalidInput for bad input)
                outcomes.append(exc)
        if inputs:
            probabilities = loaded.module.predict(loaded.model, np.stack(list(inputs.values())))
            notify_observers(name, len(inputs))
            for (index, x), row in zip(inputs.items(), probabilities, strict=True):
                outcomes[index] = {"top": classifier.top(row, loaded.spec.labels), "seen": classifier.seen(x)}
        return outcomes

    def classify(self, loaded: Loaded, payload: Any) -> dict[str, Any]:
        from ml import classifier

        x = loaded.module.preprocess(payload)
        if loaded.batcher is not None:
            probabilities = loaded.batcher.submit(x)
        else:
            probabilities = loaded.module.predict(loaded.model, x[None])[0]
        return {"top": classifier.top(probabilities, loaded.spec.labels), "seen": classifier.seen(x)}

    def generate(self, loaded: Loaded, payload: Any, on_progress: Progress | None) -> dict[str, Any]:
        request = loaded.module.preprocess(payload)
        if request["mode"] == "suggest":
            return {"suggestions": loaded.module.suggest(loaded.model, request["prompt"])}
        seed = request.get("seed")
        if seed is None:
            seed = request["seed"] = loaded.module.random_seed()
        text = ""
        for chunk in loaded.module.generate(loaded.model, request["prompt"], request["length"],
                                            request["temperature"], seed=seed, chunk=self.chunk_chars):
            text += chunk
            if on_progress is not None:
                on_progress(round(100.0 * len(text) / request["length"], 1), {"text": text})
        return {"text": text, **request}

    def train(self, name: str, epochs: int | None = None, on_progress: Progress | None = None,
              verbose: int = 0, only_missing: bool = False) -> dict[str, Any]:
        """Retrain ``name`` into the model directory and swap the warm copy for the new one.

        One model trains at a time in this process (a second waits, reporting whom it waits
        for). ``only_missing``: a model already trained is not retrained; its card is returned.
        """
        spec = self.spec(name)
        ok, reason = spec.available()
        if not ok:
            raise ModelUnavailable(name, reason)
        self._take_turn(name, on_progress)
        try:
            card = spec.card(self.model_dir) if only_missing and spec.is_trained(self.model_dir) else None
            if card is not None:
                logger.info("%s is already trained; not retraining", name)
                return card
            from ml import device

            device.configure()
            card = importlib.import_module(spec.module).train(self.model_dir, epochs, verbose=verbose,
                                                              on_progress=on_progress)
        finally:
            with self._turns:
                self._training = None
                self._turns.notify_all()
        with self._lock:
            old = self._models.pop(name, None)
        if old is not None and old.batcher is not None:
            old.batcher.close()
        return card

    def _take_turn(self, name: str, on_progress: Progress | None) -> None:
        """Wait until no model trains and every training that asked before us has had its turn,
        reporting whom we wait for (each report is also a cancellation check: a cancelled
        waiter raises here, leaves the line and never trains)."""
        token = object()
        with self._turns:
            self._waiting.append(token)
            try:
                while self._training is not None or self._waiting[0] is not token:
                    if on_progress is not None:
                        on_progress(0.0, {"stage": WAITING, "behind": self._training or "another model"})
                    self._turns.wait(TRAIN_WAIT_REPORT_SECONDS)
            except BaseException:
                self._waiting.remove(token)
                self._turns.notify_all()
                raise
            self._waiting.popleft()
            self._training = name

    def close(self) -> None:
        with self._lock:
            for loaded in self._models.values():
                if loaded.batcher is not None:
                    loaded.batcher.close()
            self._models.clear()
