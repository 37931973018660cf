"""Celery result backend on etcd v3: results pushed through watches, progress, task streams.

``result_backend = "etcdv3://host:2379"`` once ``etcd_broker`` is imported (or through the
``celery.result_backends`` entry point). Options come from the URL and from
``result_backend_transport_options``: ``prefix``, ``user``, ``password``, ``ca_cert``,
``cert_key``, ``cert_cert``, ``timeout`` (the transport's). Key layout and guarantees:
docs/results.md.
"""
from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from celery import current_app, current_task, maybe_signature, states
from celery.backends.asynchronous import AsyncBackendMixin
from celery.backends.base import Backend, BaseKeyValueStoreBackend
from celery.exceptions import ChordError, Ignore, ImproperlyConfigured
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import GroupResult, allow_join_result
from kombu.utils.encoding import bytes_to_str, ensure_bytes
from kombu.utils.functional import retry_over_time

from etcd_broker import compat
from etcd_broker.backend.deferred import DeferredStarted
from etcd_broker.backend.result_consumer import ResultConsumer
from etcd_broker.backend.result_store import CHORD_CLAIM_TTL, ChordClaim, ResultStore, WriteOutcome, store_for
from etcd_broker.backend.task_events import TaskEvent, TaskStream, iter_events
from etcd_broker.core.client import CONNECTION_ERRORS, ETCD_OPTIONS, EtcdConfig
from etcd_broker.core.keys import DEFAULT_PREFIX, KeySpace
from etcd_broker.exceptions import EtcdConfigError, EtcdNoSpace
from etcd_broker.transport import settle

logger = logging.getLogger(__name__)

__all__ = ("EtcdBackend", "TaskEvent", "TaskStream", "follow_task", "watch_task")

DEFAULT_URL = "etcdv3://127.0.0.1:2379"
#: Keys of result_backend_transport_options that Celery itself reads (not global_keyprefix:
#: our keys come from KeySpace, so it would be silently ignored; ``prefix`` does that job).
CELERY_OPTIONS = ("retry_policy",)
KNOWN_OPTIONS = ("prefix", "started_delay", *ETCD_OPTIONS, *CELERY_OPTIONS)
#: Errors a result write waits out (retry_policy): etcd unreachable, or full until an operator frees space.
RETRIED_ERRORS = (*CONNECTION_ERRORS, EtcdNoSpace)
#: Seconds a running task's STARTED is held back (``task_track_started``): a task done sooner never
#: writes it (one etcd proposal less per short job); 0 writes it at once, as Celery does.
STARTED_DELAY = 0.5
#: How long a chord's last part waits for another process's publisher claim to end (seconds):
#: a dead holder's claim lapses within its TTL plus one lease bucket.
CHORD_CLAIM_WAIT = 3 * CHORD_CLAIM_TTL
#: Waits (each ``result_chord_join_timeout``, 3 s by default) for a complete chord's stored results.
CHORD_JOIN_ATTEMPTS = 5
#: Poll interval while waiting for that claim (seconds).
CHORD_CLAIM_POLL = 0.5
_PASSWORD_IN_URL = re.compile(r"(://[^:/@;]*:)[^@;]*@")


class EtcdBackend(BaseKeyValueStoreBackend, AsyncBackendMixin):
    """Task states in etcd, one key per task; waiters are woken by etcd watch events.

    Base classes in redis.py's order, so AsyncBackendMixin (not SyncBackendMixin's
    polling) provides get(), join_native() and iter_native().
    """

    ResultConsumer = ResultConsumer

    supports_autoexpire = True
    supports_native_join = True

    def __init__(self, url: str | None = None, **kwargs: Any) -> None:
        super().__init__(expires_type=int, url=url, **kwargs)
        options = dict(self.app.conf.get("result_backend_transport_options") or {})
        _check_options(options)
        self.url = url or DEFAULT_URL
        try:
            self.config = EtcdConfig.from_url(self.url, **{k: options[k] for k in ETCD_OPTIONS if k in options})
        except EtcdConfigError as exc:
            raise ImproperlyConfigured(f"result_backend: {exc}") from exc
        self.prefix = options.get("prefix", DEFAULT_PREFIX)
        self.keys = KeySpace(self.prefix)
        self.retry_policy = {**Backend.retry_policy, **options.get("retry_policy", {})}
        self.started = DeferredStarted(_started_delay(options))
        self.result_consumer = self.ResultConsumer(
            self, self.app, self.accept, self._pending_results, self._pending_messages)

    @property
    def store(self) -> ResultStore:
        """This process's shared store for our etcd cluster and prefix."""
        return store_for(self.config, self.prefix)

    # -- keys: every one comes from KeySpace -----------------------------------------
    def get_key_for_task(self, task_id: str, key: str = "") -> bytes:
        _require_id(task_id, "task_id")
        return self.keys.result(bytes_to_str(task_id)).encode()

    def get_key_for_group(self, group_id: str, key: str = "") -> bytes:
        _require_id(group_id, "group_id")
        return self.keys.group_result(bytes_to_str(group_id)).encode()

    def get_key_for_chord(self, group_id: str, key: str = "") -> bytes:
        _require_id(group_id, "group_id")
        return self.keys.chord(bytes_to_str(group_id)).encode()

    # -- KeyValueStoreBackend's primitives ----------------------------------------------
    def get(self, key: bytes) -> bytes | None:
        """A read waits out an outage as a write does: in a worker, reads run inside a task (a chord's
        join, Celery's look-up of a redelivered task), which a leader change would otherwise fail."""
        return self._ensure(self.store.get, key)

    def mget(self, keys: Iterable[bytes]) -> list[bytes | None]:
        return self._ensure(self.store.get_many, list(keys))

    def set(self, key: bytes, value: str | bytes) -> None:
        self._ensure(self.store.put, key, ensure_bytes(value), self.expires)

    def delete(self, key: bytes) -> None:
        self._ensure(self.store.delete, key)

    def _store_result(self, task_id: str, result: Any, state: str, traceback: Any = None,
                      request: Any = None, **kwargs: Any) -> Any:
        """One compare-and-put; never overwrites SUCCESS; a progress write may stop a cancelled task."""
        task_id = bytes_to_str(task_id)
        meta = self._get_result_meta(result=result, state=state, traceback=traceback, request=request)
        meta["task_id"] = task_id
        running_here = _running_here(task_id)
        if state == states.STARTED and running_here and self.started.delay:
            self.started.hold(task_id, lambda: self._write_state(task_id, state, meta, False))
            return result
        self.started.drop(task_id)
        progress_point = state not in states.ALL_STATES and running_here
        if progress_point and _revoked_here(task_id):
            self._stop(task_id)
        # a chord part's message outlives its SUCCESS until the part is counted and the callback
        # published: its redelivery is what publishes the callback if this worker dies in between
        self._write_state(task_id, state, meta, progress_point, settle_ack=not getattr(request, "chord", None))
        return result

    def _write_state(self, task_id: str, state: str, meta: dict, progress_point: bool,
                     settle_ack: bool = True) -> None:
        success = state == states.SUCCESS
        ack_key = settle.take(task_id, self.store.client) if success and settle_ack else None  # acks_late
        outcome = self._ensure(self.store.write_state, task_id, ensure_bytes(self.encode(meta)),
                               ttl=self.expires, success=success, check_cancel=progress_point, ack_key=ack_key)
        if outcome is WriteOutcome.CANCELLED:
            self._stop(task_id)
        elif outcome is WriteOutcome.WRITTEN_ACKED:
            settle.settled(task_id)

    def _forget(self, task_id: str) -> None:
        self._ensure(self.store.forget, bytes_to_str(task_id))

    def forget(self, task_id: str) -> None:
        super().forget(task_id)
        self.result_consumer.cancel_for(task_id)

    def on_task_call(self, producer: Any, task_id: str) -> None:
        """A task is being sent from here: the result consumer counts it as awaited (no etcd call)."""
        self.result_consumer.on_task_call(task_id)

    def get_many(self, task_ids: Iterable[str], timeout: float | None = None, interval: float = 0.5,
                 no_ack: bool = True, on_message: Callable | None = None, on_interval: Callable | None = None,
                 max_iterations: int | None = None, **kwargs: Any) -> Iterator[tuple[str, dict]]:
        """(task_id, meta) for each finished task: one read, then watches instead of Celery's 0.5 s poll."""
        ids = list(dict.fromkeys(bytes_to_str(task_id) for task_id in task_ids))
        for task_id, stored in self.store.read_many(ids)[0].items():
            meta = self.meta_from_decoded(self.decode_result(stored.value))
            if meta["status"] in states.READY_STATES:
                ids.remove(task_id)
                yield task_id, meta
        if ids and max_iterations != 1:
            waiting = self.app.ResultSet([self.app.AsyncResult(task_id, backend=self) for task_id in ids])
            yield from self.iter_native(waiting, timeout=timeout, on_message=on_message, on_interval=on_interval)

    # -- chords: counted in one etcd transaction, no chord_unlock -----------------------
    def apply_chord(self, header_result_args: Any, body: Any, **kwargs: Any) -> None:
        self.ensure_chords_allowed()
        header = self.app.GroupResult(*header_result_args)
        self._ensure(self.store.reset_chord, header.id)
        self._ensure(self.store.put, self.get_key_for_group(header.id),
                     ensure_bytes(self.encode({"result": header.as_tuple()})), self._chord_result_expires)

    def set_chord_size(self, group_id: str, chord_size: int) -> None:
        self._ensure(self.store.set_chord_size, group_id, chord_size, self.chord_expires)

    def add_to_chord(self, group_id: str, result: Any) -> None:
        self._ensure(self.store.grow_chord, group_id, self.chord_expires)

    def on_chord_part_return(self, request: Any, state: str, result: Any, **kwargs: Any) -> None:
        group_id, task_id = request.group, request.id
        if not group_id or not task_id:
            return
        part = f"{task_id}.{request.group_index}"
        count = self._ensure(self.store.chord_part_done, group_id, part, self.chord_expires)
        if count is None:  # counted before: its first run may have died after counting the last part
            if self._ensure(self.store.chord_due, group_id):
                logger.warning("chord %s: every part is counted but the chord is not settled "
                               "(its counter died?); taking over", group_id)
                self._complete_chord(request, group_id)
            return
        if count.size is None or count.done < count.size:
            return  # more parts to come
        if count.done > count.size:
            logger.warning("chord %s: %d parts finished for size %d", group_id, count.done, count.size)
            return
        self._complete_chord(request, group_id)

    def _complete_chord(self, request: Any, group_id: str) -> None:
        """Publish the callback once: claim, skip if it already ran, publish, then delete the chord's keys."""
        if not self._claim_chord(group_id):
            return
        callback = maybe_signature(request.chord, app=self.app)
        if callback.id and self.store.read(callback.id)[0] is not None:
            logger.warning("chord %s: callback %s has a state already (published before a crash)",
                           group_id, callback.id)
            self._ensure(self.store.delete_chord, group_id)
            return
        deps = GroupResult.restore(group_id, backend=self)
        try:
            if deps is None:
                raise ChordError(f"GroupResult {group_id} no longer exists")
            values = self._join_parts(deps)
        except Exception as exc:  # noqa: BLE001 - any failure fails the chord, as in Celery
            self._chord_failed(callback, group_id, deps, exc)
        else:
            self._chord_publish(callback, group_id, values)
        finally:
            self._ensure(self.store.delete_chord, group_id)

    def _join_parts(self, deps: GroupResult) -> list:
        """The header's results. Every part is counted, so each result is stored: a wait that times out is a
        slow etcd (a stalled member, an election), waited out up to :data:`CHORD_JOIN_ATTEMPTS` times; only
        a part's own failure fails the chord (a 3 s stall failed chords whose parts had all succeeded)."""
        timeout = self.app.conf.result_chord_join_timeout
        for attempt in range(1, CHORD_JOIN_ATTEMPTS):
            try:
                with allow_join_result():
                    return deps.join_native(timeout=timeout, propagate=True)
            except CeleryTimeoutError:
                logger.warning("chord %s: its results did not come within %ss (etcd slow?); waiting again (%d/%d)",
                               deps.id, timeout, attempt, CHORD_JOIN_ATTEMPTS - 1)
        with allow_join_result():
            return deps.join_native(timeout=timeout, propagate=True)

    def _claim_chord(self, group_id: str) -> bool:
        """True once this process holds the publisher claim; False if the callback was published already.

        While another process holds it, wait: it deletes the chord when done, or dies and its lease lapses.
        """
        owner = f"{socket.gethostname()}:{os.getpid()}"
        deadline = time.monotonic() + CHORD_CLAIM_WAIT
        while (claim := self._ensure(self.store.claim_chord, group_id, owner)) is ChordClaim.HELD:
            if time.monotonic() > deadline:
                logger.error("chord %s: another publisher held the claim for %.0f s; giving up", group_id,
                             CHORD_CLAIM_WAIT)
                return False
            time.sleep(CHORD_CLAIM_POLL)
        return claim is ChordClaim.CLAIMED

    def _chord_failed(self, callback: Any, group_id: str, deps: GroupResult | None, exc: Exception) -> None:
        culprit = next((r for r in deps.results if r.state in states.PROPAGATE_STATES), None) if deps else None
        reason = f"Dependency {culprit.id} raised {exc!r}" if culprit is not None else repr(exc)
        logger.error("chord %s failed: %s", group_id, reason)
        self.chord_error_from_stack(callback, _chord_error(reason, exc))

    def _chord_publish(self, callback: Any, group_id: str, values: list) -> None:
        try:
            compat.retry_publish(self.app, callback.delay, values)
        except Exception as exc:  # noqa: BLE001
            logger.exception("chord %s: publishing the callback failed", group_id)
            self.chord_error_from_stack(callback, _chord_error(f"Callback error: {exc!r}", exc))

    # -- cooperative cancel: the one owner ------------------------------------------------
    # A task is cancelled once a revoke reached its worker or request_cancel() stored a marker.
    # It stops at its next progress point (update_state with a custom state such as PROGRESS:
    # the write itself checks the marker in the same transaction) or where it calls
    # stop_if_cancelled() (at its start: a task cancelled while queued never runs). Stopping
    # records REVOKED and raises celery.exceptions.Ignore, so Celery stores nothing else.
    def request_cancel(self, task_id: str) -> None:
        """Ask ``task_id`` to stop: it ends as REVOKED at its next progress point."""
        self._ensure(self.store.request_cancel, task_id, self.expires)

    def is_cancelled(self, task_id: str) -> bool:
        """True once a revoke reached this worker or someone called :meth:`request_cancel`."""
        return _revoked_here(task_id) or self.store.is_cancelled(task_id)

    def stop_if_cancelled(self, task_id: str) -> None:
        """Inside the running task: if it was cancelled, record REVOKED and raise Ignore."""
        if self.is_cancelled(task_id):
            self._stop(task_id)

    def _stop(self, task_id: str) -> None:
        logger.info("task %s was cancelled: stopping it", task_id)
        request = current_task.request if _running_here(task_id) else None
        self.mark_as_revoked(task_id, reason="cancelled", request=request)
        raise Ignore(f"task {task_id} was cancelled")

    # -- batches (etcd_broker/batches.py) ---------------------------------------------------
    def cancelled_among(self, task_ids: Iterable[str]) -> set[str]:
        """The ids among ``task_ids`` that :meth:`is_cancelled` would call cancelled: one etcd read."""
        ids = list(task_ids)  # retried like a write: a leader move must not break the batch off
        return {task_id for task_id in ids if _revoked_here(task_id)} | self._ensure(self.store.cancelled_among, ids)

    def mark_many_as_done(self, done: Iterable[tuple[str, Any, Any]]) -> None:
        """``mark_as_done`` for each ``(task_id, result, request context)``, sharing etcd transactions.

        For requests without a chord (those go through ``mark_as_done``): each SUCCESS is stored
        unless one is stored already, with the task's ``acks_late`` message deleted in the same
        transaction where this process holds it (settle.py).
        """
        writes = []
        for task_id, result, request in done:
            meta = self._get_result_meta(result=self.encode_result(result, states.SUCCESS),
                                         state=states.SUCCESS, traceback=None, request=request)
            meta["task_id"] = task_id
            self.started.drop(task_id)
            writes.append((task_id, ensure_bytes(self.encode(meta)), settle.take(task_id, self.store.client)))
        outcomes = self._ensure(self.store.write_successes, writes, ttl=self.expires)
        for (task_id, _, _), outcome in zip(writes, outcomes, strict=True):
            if outcome is WriteOutcome.WRITTEN_ACKED:
                settle.settled(task_id)

    # -- plumbing ---------------------------------------------------------------------------
    def exception_safe_to_retry(self, exc: BaseException) -> bool:
        return isinstance(exc, CONNECTION_ERRORS)

    def _ensure(self, fun: Callable, *args: Any, **kwargs: Any) -> Any:
        """Run a write (or a read a task waits on), retrying while etcd is unreachable or full
        (the retry_policy, ~20 s by default).

        A full etcd (NOSPACE) is waited out like an outage: a task finishing while the operator
        frees space keeps its result instead of failing outside its body.
        """
        policy = self.retry_policy
        return retry_over_time(fun, RETRIED_ERRORS, args, kwargs, self._on_connection_error,
                               max_retries=policy.get("max_retries"),
                               interval_start=policy.get("interval_start", 0),
                               interval_step=policy.get("interval_step", 1),
                               interval_max=policy.get("interval_max", 1))

    def _on_connection_error(self, exc: BaseException, intervals: Iterator[float], retries: int) -> float:
        wait = next(intervals)
        logger.warning("etcd result backend %s (%s); retry %d in %.1fs",
                       "full" if isinstance(exc, EtcdNoSpace) else "unreachable", exc, retries, wait)
        return wait

    def as_uri(self, include_password: bool = False) -> str:
        """The URL for banners and logs; comma and ``;`` endpoint lists kept, passwords masked."""
        return self.url if include_password else _PASSWORD_IN_URL.sub(r"\1**@", self.url)

    def __reduce__(self, args: tuple = (), kwargs: dict | None = None) -> Any:
        return super().__reduce__(args, dict(kwargs or {}, expires=self.expires, url=self.url))


def watch_task(task_id: str, *, app: Any = None, after_revision: int | None = None,
               timeout: float | None = None) -> Iterator[TaskEvent]:
    """Yield ``task_id``'s states as they happen, ending after SUCCESS, FAILURE or REVOKED.

    First the current state (PENDING with revision 0 if nothing is stored yet), then
    each change. Pass the last ``revision`` you saw as ``after_revision`` to resume
    without missing or repeating an update. ``timeout`` bounds the wait for the next
    event (TimeoutError). Iterators in one process share one etcd watch stream.
    """
    return iter_events(_task_stream(task_id, app, after_revision), timeout)


def follow_task(task_id: str, *, app: Any = None, after_revision: int | None = None) -> TaskStream:
    """An open :class:`TaskStream` of ``task_id``'s states, for loops that keep their own clock.

    ``stream.next(timeout)`` returns the next :class:`TaskEvent` (the same sequence as
    :func:`watch_task`) or None after ``timeout`` quiet seconds, keeping the subscription;
    ``stream.finished`` turns True after a final state. Close it (``with``) when done.
    """
    return _task_stream(task_id, app, after_revision).open()


def _task_stream(task_id: str, app: Any, after_revision: int | None) -> TaskStream:
    backend = _etcd_backend(app)
    if after_revision is not None and after_revision < 0:
        raise ValueError(f"after_revision must be a revision >= 0 (got {after_revision})")
    return TaskStream(backend.store, task_id, after_revision, backend.decode)


def _etcd_backend(app: Any) -> EtcdBackend:
    app = app or current_app
    backend = app.backend
    if not isinstance(backend, EtcdBackend):
        raise TypeError(f"watch_task needs the etcd result backend, but app {app.main!r} uses "
                        f"{type(backend).__name__} (result_backend={app.conf.result_backend!r})")
    return backend


def _check_options(options: dict) -> None:
    unknown = sorted(set(options) - set(KNOWN_OPTIONS))
    if unknown:
        raise ImproperlyConfigured(
            f"unknown result_backend_transport_options {unknown} for the etcd backend; known: {list(KNOWN_OPTIONS)}")


def _started_delay(options: dict) -> float:
    delay = options.get("started_delay", STARTED_DELAY)
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or delay < 0:
        raise ImproperlyConfigured(
            f"result_backend_transport_options started_delay must be seconds >= 0 (0: at once), got {delay!r}")
    return float(delay)


def _require_id(value: Any, name: str) -> None:
    if not value:
        raise ValueError(f"{name} must not be empty. Got {value!r} instead.")


def _chord_error(message: str, cause: Exception) -> ChordError:
    error = ChordError(message)
    error.__cause__ = cause
    return error


def _running_here(task_id: str) -> bool:
    """True inside the task ``task_id`` itself (celery.current_task is None elsewhere)."""
    return bool(current_task) and getattr(current_task.request, "id", None) == task_id


def _revoked_here(task_id: str) -> bool:
    """True if this worker process received a revoke for ``task_id`` (pidbox broadcast)."""
    from celery.worker import state as worker_state

    return task_id in worker_state.revoked

