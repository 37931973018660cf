"""Batched tasks: the messages a worker receives together run as one call of the task.

A worker claims up to 32 messages in one etcd transaction and the transport hands them to
Celery's consumer in one go. For a task whose work batches (a model's forward pass), running
each through Celery's per-task machinery (a pool hand-off, a trace, a cancel read, a result
transaction, log lines) costs more than the work. A :class:`BatchTask` keeps Celery's strategy
for every message (revokes, expiry, ETA, rate limits, ``task-received`` events, ``inspect
reserved``), then, instead of one pool job per request, collects the requests delivered in the
same turn of the worker's event loop and runs them as one pool job:

1. each request is accepted (``inspect active``, ``task-started``) as Celery's pool would;
2. the cancel markers of the whole batch are read at once (``backend.cancelled_among``, one
   etcd transaction on :class:`~etcd_broker.backend.result_backend.EtcdBackend`): a job cancelled while queued
   never starts, as with ``stop_if_cancelled``;
3. ``task.run_batch(calls)`` runs them together (each a :class:`Call`: the request's id,
   arguments and delivery info) and returns one outcome per call, a value or an exception;
4. the values are stored together (``backend.mark_many_as_done``: one shared etcd transaction
   that also deletes the ``acks_late`` messages, consumer.py), then each request finishes as
   Celery's pool would finish it (ack, ``task-succeeded``/``task-failed``, ready).

A request is run alone, through Celery's own path, when batching cannot keep its meaning: the
prefork pool (a batch cannot cross into a child process without pickling the requests), a
request with callbacks, errbacks, a chain or a chord, and any request ``task.batchable()``
refuses (for instance one that reports progress for a long time). Each batched request still
sends Celery's ``task_prerun``, ``task_success``/``task_failure``, ``task_postrun`` and
``task_revoked`` signals (metrics and hooks keep counting tasks); it writes no STARTED state (a
batch finishes in milliseconds), and ``self.request`` is not set inside ``run_batch``.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from time import monotonic
from typing import Any

from billiard.einfo import ExceptionInfo
from celery import Task, signals, states
from celery.app.task import Context
from celery.concurrency import solo, thread
from celery.worker import state as worker_state
from celery.worker.strategy import default as default_strategy
from kombu.asynchronous import get_event_loop

logger = logging.getLogger(__name__)

#: Pools whose jobs run in this process: a batch of Request objects can be handed to them as is.
IN_PROCESS_POOLS = (thread.TaskPool, solo.TaskPool)


@dataclass(frozen=True)
class Call:
    """One request of a batch as ``run_batch`` sees it."""

    id: str
    args: tuple
    kwargs: dict[str, Any]
    #: The message's delivery info (``redelivered``, ``priority``, ``routing_key``...).
    delivery_info: dict[str, Any] = field(default_factory=dict)


def call_of(request: Any) -> Call:
    """The :class:`Call` of a worker request."""
    return Call(request.id, tuple(request.args), dict(request.kwargs), dict(request.delivery_info or {}))


def task_context(request: Any) -> Context:
    """The task context of a worker request, as Celery's trace hands it to the result backend
    (``request=`` of ``mark_as_done``: name, arguments, callbacks, errbacks, chain, chord).

    Public names only: the request's headers (``request_dict``) with the ``embed`` part of its
    body, as Celery's ``Request._context`` merges them. A protocol-2 request keeps its body
    encoded, and kombu's ``message.payload`` is the decoded one (cached: the strategy read it
    already); a protocol-1 message was turned into a decoded ``(args, kwargs, embed)`` body.
    """
    body = request.body
    if isinstance(body, (bytes, str)):
        body = request.message.payload
    _, _, embed = body
    return Context({**request.request_dict, **(embed or {})})


class BatchTask(Task):
    """A task whose requests received together run as one ``run_batch`` call (see the module)."""

    abstract = True
    #: Most requests in one call of ``run_batch``.
    batch_max_size = 32
    Strategy = "etcd_broker.batches:strategy"

    def batchable(self, call: Call) -> bool:
        """Whether this request may run in a batch (else it runs alone, through Celery's path)."""
        return True

    def run_batch(self, calls: list[Call]) -> list[Any]:
        """Run every call; one outcome per call, in order: its value, or the exception it raised
        (an exception raised here fails the whole batch)."""
        outcomes: list[Any] = []
        for call in calls:
            try:
                outcomes.append(self.run(*call.args, **call.kwargs))
            except Exception as exc:  # noqa: BLE001 - the outcome of that call
                outcomes.append(exc)
        return outcomes


class _ConsumerView:
    """Celery's consumer as the default strategy sees it, with our batcher as its request handler."""

    def __init__(self, consumer: Any, on_task_request: Callable[[Any], None]) -> None:
        self._consumer = consumer
        self.on_task_request = on_task_request

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)


def strategy(task: BatchTask, app: Any, consumer: Any, **kwargs: Any) -> Callable[..., Any]:
    """The default strategy of ``task``, handing its requests to a :class:`Batcher`."""
    batcher = Batcher(task, consumer)
    return default_strategy(task, app, _ConsumerView(consumer, batcher.add), **kwargs)


class Batcher:
    """Collects one task's requests for a turn of the event loop, then runs them as batches."""

    def __init__(self, task: BatchTask, consumer: Any) -> None:
        self.task, self.consumer = task, consumer
        self.pool = consumer.pool
        self.batching = isinstance(self.pool, IN_PROCESS_POOLS)
        self._buffer: list[Any] = []
        self._flush_due = False

    def add(self, request: Any) -> None:
        """Called by the strategy for each request ready to run (where Celery would run it)."""
        if not (self.batching and self._batchable(request)):
            self.consumer.on_task_request(request)
            return
        self._buffer.append(request)
        if len(self._buffer) >= self.task.batch_max_size:
            self.flush()
            return
        hub = get_event_loop()
        if hub is None:
            self.flush()
        elif not self._flush_due:
            self._flush_due = True
            hub.call_soon(self.flush)  # after the rest of this delivery

    def _batchable(self, request: Any) -> bool:
        context = task_context(request)
        if context.callbacks or context.errbacks or context.chain or context.chord:
            return False
        return self.task.batchable(call_of(request))

    def flush(self) -> None:
        """Hand the collected requests to the pool, ``batch_max_size`` at a time."""
        self._flush_due = False
        requests, self._buffer = self._buffer, []
        # a connection reset in between made Celery forget them (their messages went back)
        requests = [r for r in requests if r in worker_state.reserved_requests and not r.revoked()]
        size = self.task.batch_max_size
        for start in range(0, len(requests), size):
            batch = requests[start:start + size]
            self.pool.apply_async(run_batch, args=(self.task, batch), callback=_ignore)


def _ignore(result: Any) -> None:
    """The pool's callback: each request of the batch has finished already."""


def run_batch(task: BatchTask, requests: list[Any]) -> None:
    """In a pool thread: accept, check cancels, run, store and finish every request of one batch.

    Whatever raises outside ``run_batch`` (etcd unreachable past the backend's retry policy, a
    bug), every request not finished yet is given back: Celery's thread pool keeps a job's
    exception in a future nobody reads, so the requests would stay accepted, never run, their
    messages held by this live worker for as long as it lives.
    """
    try:
        _run_batch(task, requests)
    except BaseException as exc:
        _give_back_unfinished(task, requests, exc)
        if not isinstance(exc, Exception):
            raise


def _give_back_unfinished(task: BatchTask, requests: list[Any], exc: BaseException) -> None:
    """The batch broke off: each request not finished goes back to the queue (redelivered, at its place)."""
    unfinished = [r for r in requests if r in worker_state.active_requests or r in worker_state.reserved_requests]
    logger.error("%s: batch of %d broke off (%r); %d unfinished request(s) go back to the queue",
                 task.name, len(requests), exc, len(unfinished), exc_info=exc)
    for request in unfinished:
        worker_state.task_ready(request)
        try:
            request.reject(requeue=True)  # a no-op for a request acked already (not acks_late)
        except Exception:  # noqa: BLE001 - given back at a reset already; the others still go back
            logger.exception("task %s: message not given back", request.id)


def _run_batch(task: BatchTask, requests: list[Any]) -> None:
    pid, accepted = os.getpid(), monotonic()
    for request in requests:
        request.on_accepted(pid, accepted)
    cancelled_among = getattr(task.backend, "cancelled_among", None)
    cancelled = cancelled_among([r.id for r in requests]) if cancelled_among else set()
    for request in requests:
        if request.id in cancelled:
            _finish_cancelled(task, request)
    runnable = [r for r in requests if r.id not in cancelled]
    if not runnable:
        return
    for request in runnable:
        signals.task_prerun.send(sender=task, task_id=request.id, task=task, args=request.args, kwargs=request.kwargs)
    started = monotonic()
    try:
        outcomes = task.run_batch([call_of(r) for r in runnable])
        if len(outcomes) != len(runnable):
            raise RuntimeError(f"{task.name}.run_batch returned {len(outcomes)} outcomes for {len(runnable)} calls")
    except Exception as exc:  # noqa: BLE001 - every request of the batch fails with it
        logger.exception("%s: batch of %d failed", task.name, len(runnable))
        outcomes = [exc] * len(runnable)
    runtime = monotonic() - started
    done = [(r, value) for r, value in zip(runnable, outcomes, strict=True) if not isinstance(value, BaseException)]
    _store(task, done)
    for request, value in done:
        request.on_success((False, value, runtime))
        signals.task_success.send(sender=task, result=value)
    failed = [(r, value) for r, value in zip(runnable, outcomes, strict=True) if isinstance(value, BaseException)]
    for request, exc in failed:
        _finish_failed(task, request, exc)
    for request, value in zip(runnable, outcomes, strict=True):
        signals.task_postrun.send(sender=task, task_id=request.id, task=task, args=request.args, kwargs=request.kwargs,
                                  retval=value, state=states.FAILURE if isinstance(value, BaseException) else states.SUCCESS)
    logger.info("%s: batch of %d ran in %.4fs (%d succeeded, %d failed, %d cancelled)",
                task.name, len(requests), runtime, len(done), len(failed), len(cancelled))


def _store(task: BatchTask, done: list[tuple[Any, Any]]) -> None:
    """Store every value as its task's SUCCESS: together where the backend can, else one by one."""
    if task.ignore_result:
        return
    backend = task.backend
    mark_many = getattr(backend, "mark_many_as_done", None)
    together = []
    for request, value in done:
        context = task_context(request)
        if context.ignore_result:
            continue
        if mark_many is None or context.chord:
            backend.mark_as_done(request.id, value, request=context)
        else:
            together.append((request.id, value, context))
    if together:
        mark_many(together)


def _finish_cancelled(task: BatchTask, request: Any) -> None:
    """As ``stop_if_cancelled`` at a task's start: REVOKED stored, the message acked, nothing run."""
    logger.info("task %s was cancelled: not running it", request.id)
    task.backend.mark_as_revoked(request.id, reason="cancelled", request=task_context(request))
    request.acknowledge()
    worker_state.task_ready(request)
    request.send_event("task-revoked", terminated=False, signum=None, expired=False)
    signals.task_revoked.send(sender=task, request=task_context(request), terminated=False, signum=None,
                              expired=False)


def _finish_failed(task: BatchTask, request: Any, exc: BaseException) -> None:
    """As Celery's trace and pool finish a task that raised: FAILURE stored, then ack or requeue."""
    try:
        raise exc
    except BaseException:  # noqa: BLE001 - an ExceptionInfo needs the exception being handled
        info = ExceptionInfo()
    logger.error("Task %s[%s] raised: %r", task.name, request.id, exc)
    context = task_context(request)
    task.backend.mark_as_failure(request.id, exc, info.traceback, request=context)
    signals.task_failure.send(sender=task, task_id=request.id, exception=exc, args=request.args, kwargs=request.kwargs,
                              traceback=info.tb, einfo=info)
    request.on_failure(info, return_ok=True)  # stored above: Celery only acks (or requeues) and announces
