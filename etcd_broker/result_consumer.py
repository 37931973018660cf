"""Celery's async result consumer fed by etcd watch events: get() wakes on the put, never polls.

Follows celery.backends.redis.ResultConsumer: subscribe to a task in ``on_task_call``
(before it can finish), read what is stored when that cannot be known to be covered,
stop at a final state. Events come from the process's one results watch
(result_router.py) into this consumer's inbox; ``drain_events`` empties it in the
waiting thread, blocking on a condition variable meanwhile.
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
from etcd_broker.result_router import ResultRouter
from etcd_broker.result_store import ResultStore, Stored

logger = logging.getLogger(__name__)

#: drain_events() waits at most this long per call, so get(timeout=...) is checked this often.
MAX_DRAIN_WAIT = 1.0
#: The shortest wait per drain_events() call when a get() has a tiny timeout (seconds).
MIN_DRAIN_WAIT = 0.01
#: Inbox marker: read the key again (the watch was (re)created after we subscribed).
REREAD = None

Item = tuple[str, "Stored | None"]


class ResultConsumer(BaseResultConsumer):
    """Delivers task states from etcd watch events to waiting AsyncResults."""

    _connection_errors = CONNECTION_ERRORS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reset()

    def _reset(self) -> None:
        self._arrived = threading.Condition(threading.Lock())
        self._inbox: list[Item] = []
        #: task id -> True if every write of it will reach us (subscribed while the watch was live,
        #: before the task was published), False if what is stored must be read.
        self._wanted: dict[str, bool] = {}
        self._seen: dict[str, int] = {}
        self._cancels: deque[str] = deque()

    @property
    def store(self) -> ResultStore:
        return self.backend.store

    @property
    def router(self) -> ResultRouter:
        return self.store.router

    # -- Celery's interface --------------------------------------------------------
    def start(self, initial_task_id: str, **kwargs: Any) -> None:
        self.consume_from(initial_task_id)

    def consume_from(self, task_id: str) -> None:
        """Subscribe to ``task_id``, whose result may exist already (a read will tell)."""
        self._subscribe(task_id, fresh=False)

    def consume_fresh(self, task_id: str) -> None:
        """Subscribe to a task about to be published (``on_task_call``): nothing stored yet."""
        self._subscribe(task_id, fresh=True)

    def cancel_for(self, task_id: str) -> None:
        # Runs from AsyncResult.__del__ in any thread, so it only queues; never blocks.
        self._cancels.append(task_id)

    def stop(self) -> None:
        self._cancels.extend(list(self._wanted))
        self._flush_cancels()

    def on_after_fork(self) -> None:
        self._reset()  # the parent's watch stream did not survive; the store gives a new one

    def on_state_change(self, meta: dict, message: Any) -> None:
        super().on_state_change(meta, message)
        if meta["status"] in states.READY_STATES:
            self.cancel_for(meta["task_id"])

    def on_wait_for_pending(self, result: Any, timeout: float | None = None, **kwargs: Any) -> None:
        """Read results that may be stored already; drain_events() delivers them (on_message set)."""
        ids = [task_id for task_id in _task_ids(result) if not self._wanted.get(task_id)]
        if ids:
            # If the watch is not live yet, it asks for another read once it is.
            self._post(list(self._read(ids).items()))

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
        for task_id, stored in sorted(_events(batch), key=_revision):
            self._deliver(task_id, stored)
        rereads = [task_id for task_id, stored in batch if stored is REREAD and self._still_wanted(task_id)]
        for task_id, stored in sorted(self._read(rereads).items(), key=_revision):
            self._deliver(task_id, stored)  # after the events: they may have made the read moot
        if batch:
            with self._arrived:
                self._arrived.notify_all()  # another thread sharing this backend may wait on these

    # -- delivery ---------------------------------------------------------------------
    def _subscribe(self, task_id: str, fresh: bool) -> None:
        self._flush_cancels()
        if task_id not in self._wanted:
            self._wanted[task_id] = False
            live = self.router.subscribe(task_id, self._post_one)
            self._wanted[task_id] = live and fresh

    def _still_wanted(self, task_id: str) -> bool:
        return task_id in self._wanted and task_id not in self._cancels

    def _deliver(self, task_id: str, stored: Stored) -> None:
        if not self._still_wanted(task_id):
            return  # done with it already
        if stored.mod_revision <= self._seen.get(task_id, 0):
            return  # replayed after a reconnect, or both read and watched
        self._seen[task_id] = stored.mod_revision
        self.on_state_change(self.backend.decode_result(stored.value), None)

    def _read(self, task_ids: list[str]) -> dict[str, Stored]:
        if not task_ids:
            return {}
        try:
            return self.store.read_many(task_ids)[0]
        except CONNECTION_ERRORS:
            logger.warning("etcd unreachable reading %d result(s); the watch will bring them", len(task_ids))
            return {}

    def _post_one(self, task_id: str, stored: Stored | None) -> None:
        self._post([(task_id, stored)])

    def _post(self, items: Sequence[Item]) -> None:
        if items:
            with self._arrived:
                self._inbox.extend(items)
                self._arrived.notify_all()

    def _flush_cancels(self) -> None:
        """Unsubscribe what cancel_for() queued, and drop its undelivered events.

        A thread that publishes tasks but never waits on them (a web view) would
        otherwise keep their events in its inbox for ever.
        """
        done = set()
        while self._cancels:
            task_id = self._cancels.popleft()
            if self._wanted.pop(task_id, None) is not None:
                self._seen.pop(task_id, None)
                self.router.unsubscribe(task_id, self._post_one)
                done.add(task_id)
        if done:
            with self._arrived:
                self._inbox = [item for item in self._inbox if item[0] not in done]


def _task_ids(result: Any) -> list[str]:
    members = getattr(result, "results", None)
    return [result.id] if members is None else [member.id for member in members]


def _events(batch: list[Item]) -> list[tuple[str, Stored]]:
    return [(task_id, stored) for task_id, stored in batch if stored is not REREAD]


def _revision(item: tuple[str, Stored]) -> int:
    return item[1].mod_revision
