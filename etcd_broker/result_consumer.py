"""Celery's async result consumer fed by etcd watch events: get() wakes on the put, never polls.

Follows celery.backends.redis.ResultConsumer, with one watch per awaited task on the
process's watch hub (watch.py), so a process receives the writes of the tasks it waits
for and nothing else. ``on_task_call`` only notes a revision this process has seen
(no round trip, no watch): a later get() watches the task's key from the revision after
it, and etcd replays from its history whatever was written before it confirmed the
watch. A task not published here is also read once (batched, at the next drain), since
its result may be stored already. Events go into this consumer's inbox; ``drain_events`` empties it in the waiting
thread, blocking on a condition variable meanwhile.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
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
#: Tasks published here whose publish revision we remember; an older one is read on get().
PUBLISHED_MEMORY = 65536

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
        #: task id -> revision seen before it was published here (its watch starts after it).
        self._published: OrderedDict[str, int] = OrderedDict()
        #: task id -> its watch, and whether its current state must be read (not published here).
        self._watches: dict[str, Watch] = {}
        self._to_read: set[str] = set()
        self._seen: dict[str, int] = {}
        self._cancels: deque[str] = deque()

    @property
    def store(self) -> ResultStore:
        return self.backend.store

    # -- Celery's interface --------------------------------------------------------
    def start(self, initial_task_id: str, **kwargs: Any) -> None:
        self.consume_from(initial_task_id)

    def published(self, task_id: str) -> None:
        """``task_id`` is about to be published (``on_task_call``): remember a revision before it."""
        with self._lock:
            self._published[task_id] = self.store.known_revision()
            while len(self._published) > PUBLISHED_MEMORY:
                self._published.popitem(last=False)

    def consume_from(self, task_id: str) -> None:
        """Watch ``task_id``'s state: from before its publish if it was published here, else read it too."""
        self._flush_cancels()
        with self._lock:
            if task_id in self._watches:
                return
            since = self._published.pop(task_id, None)
            if since is None:
                self._to_read.add(task_id)
                since = self.store.known_revision()
            self._watches[task_id] = self.store.hub.subscribe(
                self.store.keys.result(task_id), lambda events: self._on_events(task_id, events),
                start_revision=since + 1, puts_only=True, on_resync=lambda: self._on_resync(task_id))

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
        self._read_new()
        with self._arrived:
            if not self._inbox:
                self._arrived.wait(timeout)
            batch, self._inbox = self._inbox, []
        for task_id, stored in sorted(batch, key=_revision):
            self._deliver(task_id, stored)
        if batch:
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

    def _read_new(self) -> None:
        """Read the tasks not published here that were subscribed since the last drain (in one go)."""
        with self._lock:
            ids, self._to_read = list(self._to_read), set()
        if not ids:
            return
        try:
            found = self.store.read_many(ids)[0]
        except CONNECTION_ERRORS:
            logger.warning("etcd unreachable reading %d result(s); reading again at the next drain", len(ids))
            with self._lock:
                self._to_read.update(task_id for task_id in ids if task_id in self._watches)
            return
        self._post(list(found.items()))

    # -- the hub's thread only fills the inbox --------------------------------------------
    def _on_events(self, task_id: str, events: Sequence[Any]) -> None:
        self._post([(task_id, Stored.from_kv(event.kv)) for event in events])

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
                self._published.pop(task_id, None)
            if watch is not None:
                self._seen.pop(task_id, None)
                self.store.hub.unsubscribe(watch)
                done.add(task_id)
        if done:
            with self._arrived:
                self._inbox = [item for item in self._inbox if item[0] not in done]


def _revision(item: Item) -> int:
    return item[1].mod_revision
