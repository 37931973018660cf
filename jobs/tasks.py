"""Celery tasks: the only glue between Celery and ``ml/``.

``run_model`` and ``train_model`` go to the ``gpu`` queue. Each worker process keeps one
``ml.serving.ModelHost`` (models load lazily and stay warm; classifiers share a micro-batcher),
so run GPU workers with threads: ``celery -A deephardway_site worker -Q gpu -P threads -c 64``.
Importing this module imports no TensorFlow; the first task (or a gpu worker's start) does.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from celery import Task, shared_task, signals
from django.conf import settings

from etcd_broker.batches import BatchTask, Call
from jobs.queues import GPU_QUEUE
from ml import registry
from ml.progress import Progress
from ml.serving import ModelHost

logger = logging.getLogger(__name__)


_host: ModelHost | None = None
_host_lock = threading.Lock()


def host() -> ModelHost:
    """This process's models, created on first use from settings."""
    global _host
    with _host_lock:
        if _host is None:
            _host = ModelHost(settings.MODEL_DIR, batch_max_size=settings.BATCH_MAX_SIZE,
                              batch_window_ms=settings.BATCH_WINDOW_MS, batching=settings.BATCHING,
                              chunk_chars=settings.TEXT_CHUNK_CHARS)
        return _host


def guarded(task: Task, work: Callable[[Progress], dict[str, Any]]) -> dict[str, Any]:
    """Run ``work(on_progress)``; cancellation is the result backend's (EtcdBackend, docs/results.md).

    A job cancelled while queued never starts (``stop_if_cancelled``); a running one stops at
    its next progress point, where the PROGRESS write finds the revoke or the cancel marker.
    On another result backend (the benchmarks' Redis rivals) only Celery's own revoke applies.
    """
    stop_if_cancelled = getattr(task.backend, "stop_if_cancelled", None)
    if stop_if_cancelled is not None:
        stop_if_cancelled(task.request.id)

    def on_progress(percent: float, meta: dict[str, Any]) -> None:
        task.update_state(state="PROGRESS", meta={"progress": percent, **meta})

    return work(on_progress)


class RunModel(BatchTask):
    """``run_model``: classify requests received together run as one forward pass (etcd_broker/batches.py).

    Requests for generators (they report progress while they run) and for unknown models run
    alone, through Celery's usual path.
    """

    abstract = True

    def batchable(self, call: Call) -> bool:
        model = call.kwargs.get("model", call.args[0] if call.args else None)
        spec = registry.MODELS.get(model) if isinstance(model, str) else None
        return spec is not None and spec.kind == "classify"

    def run_batch(self, calls: list[Call]) -> list[Any]:
        by_model: dict[str, list[int]] = {}
        payloads: dict[int, Any] = {}
        outcomes: list[Any] = [None] * len(calls)
        for index, call in enumerate(calls):
            try:
                model, payload = _model_and_payload(call.args, call.kwargs)
            except TypeError as exc:  # as calling run_model(...) with them would raise
                outcomes[index] = exc
                continue
            by_model.setdefault(model, []).append(index)
            payloads[index] = payload
        for model, indexes in by_model.items():
            try:
                results = host().classify_many(model, [payloads[i] for i in indexes])
            except Exception as exc:  # noqa: BLE001 - e.g. ModelUnavailable: every call of that model fails with it
                results = [exc] * len(indexes)
            for index, result in zip(indexes, results, strict=True):
                outcomes[index] = result
        return outcomes


def _model_and_payload(args: Any, kwargs: dict[str, Any]) -> tuple[str, Any]:
    """``run_model``'s two arguments from a call, or the TypeError calling it would raise."""
    values = dict(zip(("model", "payload"), args, strict=False)) | kwargs
    if len(args) > 2 or set(values) != {"model", "payload"}:
        raise TypeError(f"run_model() takes (model, payload); got {len(args)} positional and {sorted(kwargs)} keywords")
    return values["model"], values["payload"]


@shared_task(bind=True, base=RunModel, name="jobs.tasks.run_model", queue=GPU_QUEUE, acks_late=True)
def run_model(self: Task, model: str, payload: dict) -> dict:
    """Run one request: classify -> {"top": [...], "seen": [...]}, generate -> {"text": ...},
    suggest -> {"suggestions": [...]}; PROGRESS {"progress", "text"} while generating."""
    return guarded(self, lambda on_progress: host().run(model, payload, on_progress=on_progress))


@shared_task(bind=True, name="jobs.tasks.train_model", queue=GPU_QUEUE, acks_late=True)
def train_model(self: Task, model: str, epochs: int | None = None, only_missing: bool = False) -> dict:
    """(Re)train ``model`` into MODEL_DIR (PROGRESS: epoch, metrics, time left); returns its model
    card. ``only_missing``: a model trained meanwhile is not retrained (``manage.py dev``)."""
    return guarded(self, lambda on_progress: host().train(model, epochs, on_progress=on_progress,
                                                          only_missing=only_missing))


@signals.worker_init.connect
def configure_device(sender: Any = None, **kwargs: Any) -> None:
    """On a worker that consumes the gpu queue, pick the device now and log it."""
    queues = getattr(getattr(sender, "app", None), "amqp", None)
    names = set(queues.queues.consume_from or queues.queues) if queues is not None else set()
    if GPU_QUEUE in names:
        from ml import device

        device.configure()
