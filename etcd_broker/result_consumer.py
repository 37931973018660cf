"""Celery's async result consumer fed by etcd watch events: get() wakes on the put, never polls.

Follows celery.backends.redis.ResultConsumer, with one watch per awaited task on the
process's watch hub (watch.py), so a process receives the writes of the tasks it waits
for and nothing else; a process that only submits watches nothing. The watch starts
"now" (etcd serves it at once); once etcd confirms it, the key is read (batched at the
next drain), which finds whatever was written before the watch began. Events go into
this consumer's inbox; ``drain_events`` empties it in the waiting thread, blocking on a
condition variable meanwhile.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Sequence
from typing import Any

from celery import states
from celery.backends.asynchronous import BaseResultConsumer

from etcd_broker.client import CONNECTION_ERRORS
from etcd_broker.result_store import ResultStore, Stored
from etcd_broker.watch import Watch

logger = logging.getLogger(__name__)

#: drain_events() waits at most this long per call, so get(timeout=...) is checked this often.
MAX_DRAIN_WAIT = 1.0
#: The shortest wait per drain_events() call when a get() has a tiny timeout (seconds).
MIN_DRAIN_WAIT = 0.01
#: Our subscriptions' label in the hub's event counts.
HUB_LABEL = "results"

Item = tuple[str, Stored]


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
        #: task id -> its watch; tasks whose watch etcd (re)confirmed, so their key must be read.
        self._watches: dict[str, Watch] = {}
        self._to_read: set[str] = set()
        #: reads that failed (etcd unreachable): tried again at each drain, which still waits
        self._read_later: set[str] = set()
        self._seen: dict[str, int] = {}
        self._cancels: deque[str] = deque()

    @property
    def store(self) -> ResultStore:
        return self.backend.store

    # -- Celery's interface --------------------------------------------------------
    def start(self, initial_task_id: str, **kwargs: Any) -> None:
        self.consume_from(initial_task_id)

    def consume_from(self, task_id: str) -> None:
        """Watch ``task_id``'s key from now on; once etcd confirms the watch, read it once."""
        self._flush_cancels()
        with self._lock:
            if task_id in self._watches:
                return
            self._watches[task_id] = self.store.hub.subscribe(
                self.store.keys.result(task_id), lambda events: self._on_events(task_id, events),
                puts_only=True, on_created=lambda: self._on_created(task_id),
                on_resync=lambda: self._on_resync(task_id), label=HUB_LABEL)

    def cancel_for(self, task_id: str) -> None:
        # Runs from AsyncResult.__del__ in any thread, so it only queues; never blocks.
        self._cancels.append(task_id)

    def stop(self) -> None:
        self._cancels.extend(list(self._watches))
        self._flush_cancels()

    def on_after_fork(self) -> None:
        self._reset()  # the parent's watches did not survive; the hub is per process

    def on_state_change(self, meta: dict, message: Any) -> None:
        super().on_state_change(meta, message)
        if meta["status"] in states.READY_STATES:
            self.cancel_for(meta["task_id"])

    def drain_events_until(self, p: Any, timeout: float | None = None, on_interval: Any = None) -> Any:
        interval = MAX_DRAIN_WAIT if timeout is None else max(min(MAX_DRAIN_WAIT, timeout), MIN_DRAIN_WAIT)
        return self.drainer.drain_events_until(p, timeout=timeout, on_interval=on_interval, interval=interval)

    def drain_events(self, timeout: float | None = None) -> None:
        """Deliver what the watches brought; wait on a condition (not a sleep) if nothing did."""
        self._flush_cancels()
        with self._arrived:
            if not self._inbox and not self._to_read:
                self._arrived.wait(timeout)
            batch, self._inbox = self._inbox, []
        for task_id, stored in sorted(batch, key=_revision):
            self._deliver(task_id, stored)
        read = self._read_confirmed()  # after the events: they may have made the read moot
        for task_id, stored in sorted(read.items(), key=_revision):
            self._deliver(task_id, stored)
        if batch or read:
            self._flush_cancels()  # a final state just delivered: unsubscribe now, not at the next get()
            with self._arrived:
                self._arrived.notify_all()  # another thread sharing this backend may wait on these

    # -- delivery ---------------------------------------------------------------------
    def _deliver(self, task_id: str, stored: Stored) -> None:
        if task_id not in self._watches or task_id in self._cancels:
            return  # done with it already
        if stored.mod_revision <= self._seen.get(task_id, 0):
            return  # both read and watched
        self._seen[task_id] = stored.mod_revision
        self.on_state_change(self.backend.decode_result(stored.value), None)

    def _read_confirmed(self) -> dict[str, Stored]:
        """Read the keys whose watch etcd confirmed since the last drain (in as few reads as etcd allows)."""
        with self._lock:
            ids = [t for t in self._to_read | self._read_later if t in self._watches]
            self._to_read, self._read_later = set(), set()
        if not ids:
            return {}
        try:
            return self.store.read_many(ids)[0]
        except CONNECTION_ERRORS:
            logger.warning("etcd unreachable reading %d result(s); reading again at the next drain", len(ids))
            with self._lock:
                self._read_later.update(ids)
            return {}

    # -- the hub's thread only fills the inbox --------------------------------------------
    def _on_events(self, task_id: str, events: Sequence[Any]) -> None:
        self._post([(task_id, Stored.from_kv(event.kv)) for event in events])

    def _on_created(self, task_id: str) -> None:
        """etcd confirmed the watch (again, after a reconnect): a read covers what came before it."""
        with self._lock:
            self._to_read.add(task_id)
        with self._arrived:
            self._arrived.notify_all()

    def _on_resync(self, task_id: str) -> int:
        """etcd compacted the revision the watch resumes from: read the state instead."""
        stored, revision = self.store.read(task_id)
        if stored is not None:
            self._post([(task_id, stored)])
        return revision

    def _post(self, items: Sequence[Item]) -> None:
        if items:
            with self._arrived:
                self._inbox.extend(items)
                self._arrived.notify_all()

    def _flush_cancels(self) -> None:
        """Unsubscribe what cancel_for() queued, and drop its undelivered events."""
        done = set()
        while self._cancels:
            task_id = self._cancels.popleft()
            with self._lock:
                watch = self._watches.pop(task_id, None)
                self._to_read.discard(task_id)
                self._read_later.discard(task_id)
            if watch is not None:
                self._seen.pop(task_id, None)
                self.store.hub.unsubscribe(watch)
                done.add(task_id)
        if done:
            with self._arrived:
                self._inbox = [item for item in self._inbox if item[0] not in done]


def _revision(item: Item) -> int:
    return item[1].mod_revision
