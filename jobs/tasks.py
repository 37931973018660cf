"""Celery tasks: the only glue between Celery and ``ml/``.

``run_model`` and ``train_model`` go to the ``gpu`` queue. Each worker process keeps one
``ml.serving.ModelHost`` (models load lazily and stay warm; classifiers share a micro-batcher),
so run GPU workers with threads: ``celery -A deephardway_site worker -Q gpu -P threads -c 64``.
Importing this module imports no TensorFlow; the first task (or a gpu worker's start) does.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Task, shared_task, signals
from celery.exceptions import Ignore
from celery.worker import state as worker_state
from django.conf import settings

from ml.errors import Cancelled
from ml.serving import ModelHost

logger = logging.getLogger(__name__)

#: Queue of everything that runs a model (consumed by GPU hosts; a CPU-only host consumes it too).
GPU_QUEUE = "gpu"

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


class CancelGuard:
    """Cancellation and progress for one running task.

    Cancelled means: the id is in this worker's revoked set (a revoke broadcast arrived) or
    the result backend holds a cancel marker for it (``EtcdBackend.is_cancelled``, if offered).
    """

    def __init__(self, task: Task) -> None:
        self.task = task
        self.task_id = task.request.id

    def cancelled(self) -> bool:
        if self.task_id in worker_state.revoked:
            return True
        is_cancelled = getattr(self.task.backend, "is_cancelled", None)
        return bool(is_cancelled is not None and is_cancelled(self.task_id))

    def check(self) -> None:
        if self.cancelled():
            raise Cancelled(self.task_id)

    def progress(self, percent: float, meta: dict[str, Any]) -> None:
        """A progress point: stop here if cancelled, otherwise publish PROGRESS."""
        self.check()
        self.task.update_state(state="PROGRESS", meta={"progress": percent, **meta})

    def stop(self) -> None:
        """Record REVOKED and tell Celery to store nothing else."""
        logger.info("task %s cancelled; stopping", self.task_id)
        self.task.backend.mark_as_revoked(self.task_id, reason="cancelled", request=self.task.request)
        raise Ignore()


def guarded(task: Task, work) -> dict[str, Any]:
    """Run ``work(guard)`` unless the task was cancelled before or while it ran."""
    guard = CancelGuard(task)
    try:
        guard.check()  # a job cancelled while queued never starts
        return work(guard)
    except Cancelled:
        guard.stop()
        raise  # not reached: stop() raises Ignore


@shared_task(bind=True, name="jobs.tasks.run_model", queue=GPU_QUEUE, acks_late=True)
def run_model(self: Task, model: str, payload: dict) -> dict:
    """Run one request: classify -> {"top": [...], "seen": [...]}, generate -> {"text": ...},
    suggest -> {"suggestions": [...]}; PROGRESS {"progress", "text"} while generating."""
    return guarded(self, lambda guard: host().run(model, payload, on_progress=guard.progress))


@shared_task(bind=True, name="jobs.tasks.train_model", queue=GPU_QUEUE, acks_late=True)
def train_model(self: Task, model: str, epochs: int | None = None, only_missing: bool = False) -> dict:
    """(Re)train ``model`` into MODEL_DIR (PROGRESS: epoch, metrics, time left); returns its model
    card. ``only_missing``: a model trained meanwhile is not retrained (``manage.py dev``)."""
    return guarded(self, lambda guard: host().train(model, epochs, on_progress=guard.progress,
                                                    only_missing=only_missing))


@signals.worker_init.connect
def configure_device(sender: Any = None, **kwargs: Any) -> None:
    """On a worker that consumes the gpu queue, pick the device now and log it."""
    queues = getattr(getattr(sender, "app", None), "amqp", None)
    names = set(queues.queues.consume_from or queues.queues) if queues is not None else set()
    if GPU_QUEUE in names:
        from ml import device

        device.configure()
