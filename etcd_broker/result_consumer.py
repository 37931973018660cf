"""Celery's async result consumer fed by etcd watches: get() wakes on the put, never polls.

Follows celery.backends.redis.ResultConsumer: watch a task's key from ``on_task_call``
(before the task can finish), read what is stored before waiting, stop watching at a
final state. Every backend of a process shares one WatchStream; each consumer has an
inbox that the stream thread fills and the thread waiting in ``drain_events`` empties.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from functools import partial
from typing import Any

from celery import states
from celery.backends.asynchronous import BaseResultConsumer

from etcd_broker.client import CONNECTION_ERRORS
from etcd_broker.result_store import ResultStore, Stored
from etcd_broker.watch import EVENT_PUT, Watch

logger = logging.getLogger(__name__)

#: drain_events() waits at most this long per call, so get(timeout=...) is checked this often.
MAX_DRAIN_WAIT = 1.0
#: The shortest wait per drain_events() call when a get() has a tiny timeout (seconds).
MIN_DRAIN_WAIT = 0.01
#: Inbox marker: read the key again (its watch was re-created after the stream reconnected).
REREAD = None

Item = tuple[str, "Stored | None"]


class ResultConsumer(BaseResultConsumer):
    """Delivers task states from etcd watch events to waiting AsyncResults."""

    _connection_errors = CONNECTION_ERRORS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._arrived = threading.Condition(threading.Lock())
        self._inbox: list[Item] = []
        self._watches: dict[str, Watch] = {}
        self._created: set[str] = set()
        self._seen: dict[str, int] = {}
        self._cancels: deque[str] = deque()

    @property
    def store(self) -> ResultStore:
        return self.backend.store

    # -- Celery's interface --------------------------------------------------------
    def start(self, initial_task_id: str, **kwargs: Any) -> None:
        self.consume_from(initial_task_id)

    def consume_from(self, task_id: str) -> None:
        """Watch ``task_id``'s key (idempotent). Cheap: the create request is only queued."""
        self._flush_cancels()
        with self._lock:
            if task_id not in self._watches:
                self._watches[task_id] = self._watch(task_id)

    def cancel_for(self, task_id: str) -> None:
        # Runs from AsyncResult.__del__ in any thread, so it only queues; never blocks.
        self._cancels.append(task_id)

    def stop(self) -> None:
        with self._lock:
            watches, self._watches = list(self._watches.values()), {}
        for watch in watches:
            self.store.stream.cancel(watch)

    def on_after_fork(self) -> None:
        self._reset()  # the parent's stream thread did not survive; store_for() gives a new one

    def on_state_change(self, meta: dict, message: Any) -> None:
        super().on_state_change(meta, message)
        if meta["status"] in states.READY_STATES:
            self.cancel_for(meta["task_id"])

    def on_wait_for_pending(self, result: Any, timeout: float | None = None, **kwargs: Any) -> None:
        """Read what is stored already; drain_events() delivers it (with on_message set)."""
        ids = _task_ids(result)
        self._wait_created(ids, timeout)
        try:
            found = self.store.read_many(ids)
        except CONNECTION_ERRORS:
            logger.warning("etcd unreachable while reading %d result(s); waiting for the watch", len(ids))
            return
        self._post(list(found.items()))

    def drain_events_until(self, p: Any, timeout: float | None = None, on_interval: Any = None) -> Any:
        interval = MAX_DRAIN_WAIT if timeout is None else max(min(MAX_DRAIN_WAIT, timeout), MIN_DRAIN_WAIT)
        return self.drainer.drain_events_until(p, timeout=timeout, on_interval=on_interval, interval=interval)

    def drain_events(self, timeout: float | None = None) -> None:
        """Deliver what the watch brought; wait on a condition (not a sleep) if nothing did."""
        self._flush_cancels()
        with self._arrived:
            if not self._inbox:
                self._arrived.wait(timeout)
            batch, self._inbox = self._inbox, []
        for task_id, stored in sorted(batch, key=_revision_of):
            self._deliver(task_id, stored)
        self._flush_cancels()
        if batch:
            with self._arrived:
                self._arrived.notify_all()  # another thread sharing this backend may wait on these

    # -- delivery ---------------------------------------------------------------------
    def _deliver(self, task_id: str, stored: Stored | None) -> None:
        if task_id not in self._watches:
            return
        if stored is REREAD:
            stored = self._read(task_id)
            if stored is None:
                return
        if stored.mod_revision <= self._seen.get(task_id, 0):
            return  # replayed after a reconnect, or read and also watched
        self._seen[task_id] = stored.mod_revision
        self.on_state_change(self.backend.decode_result(stored.value), None)

    def _read(self, task_id: str) -> Stored | None:
        try:
            return self.store.read(task_id)[0]
        except CONNECTION_ERRORS:
            logger.warning("etcd unreachable re-reading task %s; the watch will bring it", task_id)
            return None

    def _post(self, items: Sequence[Item]) -> None:
        if items:
            with self._arrived:
                self._inbox.extend(items)
                self._arrived.notify_all()

    # -- watches ------------------------------------------------------------------------
    def _watch(self, task_id: str) -> Watch:
        store = self.store
        watch = store.stream.watch(store.keys.result(task_id), partial(self._on_events, task_id),
                                   on_created=partial(self._on_created, task_id),
                                   on_resync=partial(self._on_resync, task_id))
        if store.revision and not watch.next_revision:
            # The first create is synced to "now" (no replay delay); a re-create after a
            # reconnect resumes from a revision we know is not later than that.
            watch.next_revision = store.revision + 1
        return watch

    def _wait_created(self, task_ids: Iterable[str], timeout: float | None) -> None:
        """Make the read that follows cover whatever the watch misses.

        On a connected stream, wait (one round trip) until etcd confirms each watch. If
        it is not connected, do not wait: the key is read again once etcd confirms it.
        """
        stream = self.store.stream
        limit = self.store.config.timeout if timeout is None else min(timeout, self.store.config.timeout)
        deadline = time.monotonic() + limit
        for task_id in task_ids:
            watch = self._watches.get(task_id)
            if watch is None or watch.created.is_set():
                continue
            if not (stream.connected and stream.wait_created(watch, max(deadline - time.monotonic(), 0))):
                self._created.add(task_id)  # so _on_created posts a re-read

    def _flush_cancels(self) -> None:
        while self._cancels:
            task_id = self._cancels.popleft()
            with self._lock:
                watch = self._watches.pop(task_id, None)
                self._seen.pop(task_id, None)
                self._created.discard(task_id)
            if watch is not None:
                self.store.stream.cancel(watch)

    # -- stream thread callbacks ------------------------------------------------------
    def _on_events(self, task_id: str, events: Sequence[Any]) -> None:
        self.store.saw_revision(events[-1].kv.mod_revision)
        self._post([(task_id, Stored.from_kv(e.kv)) for e in events if e.type == EVENT_PUT])

    def _on_created(self, task_id: str) -> None:
        if task_id in self._created:
            self._post([(task_id, REREAD)])  # re-created after a reconnect: read it again
        else:
            self._created.add(task_id)

    def _on_resync(self, task_id: str) -> int:
        stored, revision = self.store.read(task_id)
        if stored is not None:
            self._post([(task_id, stored)])
        return revision


def _task_ids(result: Any) -> list[str]:
    members = getattr(result, "results", None)
    return [result.id] if members is None else [member.id for member in members]


def _revision_of(item: Item) -> int:
    return item[1].mod_revision if item[1] is not None else 0
