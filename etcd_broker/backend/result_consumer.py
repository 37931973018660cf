"""Celery's async result consumer fed by etcd watch events: get() wakes on the put, never polls.

Follows celery.backends.redis.ResultConsumer. Celery gives each thread its own backend and
consumer; what they await is followed on the process's watch hub (watch.py) in one of two ways:

* a lone waiter subscribes its own task's key from now and reads it once etcd confirms the
  subscription: the process receives the writes of that task and nothing else;
* while the process awaits several results at once (in get(), or sent from here and still
  held), one subscription of the whole results prefix (:class:`SharedWaits`, one per process
  and store) serves every thread: writes of other processes' tasks are dropped here. A task
  sent after that subscription was confirmed needs no read (its result is written later, so
  it arrives as an event); the others are read once after the confirmation, in shared batches.

Events go into each consumer's inbox; ``drain_events`` empties it in the waiting thread,
blocking on a condition variable meanwhile.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from celery import states
from celery.backends.asynchronous import BaseResultConsumer

from etcd_broker.backend.result_store import ResultStore, Stored
from etcd_broker.core import forking
from etcd_broker.core.client import CONNECTION_ERRORS
from etcd_broker.core.watch import Watch

logger = logging.getLogger(__name__)

#: drain_events() waits at most this long per call, so get(timeout=...) is checked this often.
MAX_DRAIN_WAIT = 1.0
#: The shortest wait per drain_events() call when a get() has a tiny timeout (seconds).
MIN_DRAIN_WAIT = 0.01
#: Our subscriptions' label in the hub's event counts.
HUB_LABEL = "results"
#: Results awaited at once in a process (in get(), or sent and still held) that switch it to the prefix.
PREFIX_MIN_AWAITED = 2
#: The prefix subscription ends this long (seconds) after the process last awaited several results.
PREFIX_LINGER = 2.0
#: Sent-but-not-awaited tasks remembered (oldest forgotten first; a forgotten one is read when awaited).
MAX_REMEMBERED = 10_000
#: At most this many sent tasks are read ahead when the prefix subscription is confirmed.
MAX_READ_AHEAD = 1_000

Item = tuple[str, Stored]
#: ``ResultConsumer._watches`` value of a task served by the prefix subscription.
PREFIX = None


class ResultConsumer(BaseResultConsumer):
    """Delivers task states from etcd watch events to waiting AsyncResults."""

    _connection_errors = CONNECTION_ERRORS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reset()
        # A forked child keeps using its thread's backend: the parent's watches and locks are not its own.
        forking.reset_in_child(self, ResultConsumer._reset)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._arrived = threading.Condition(threading.Lock())
        self._inbox: list[Item] = []
        #: task id -> its own watch, or PREFIX (served by the process's prefix subscription)
        self._watches: dict[str, Watch | None] = {}
        #: tasks whose own watch etcd (re)confirmed, so their key must be read.
        self._to_read: set[str] = set()
        #: reads that failed (etcd unreachable): tried again at each drain, which still waits
        self._read_later: set[str] = set()
        self._seen: dict[str, int] = {}
        self._cancels: deque[str] = deque()

    @property
    def store(self) -> ResultStore:
        return self.backend.store

    @property
    def shared(self) -> SharedWaits:
        """This process's awaited results under our store (shared by every thread's consumer)."""
        return shared_waits(self.store)

    @property
    def following_prefix(self) -> bool:
        """Whether this process follows the whole results prefix now (several results awaited)."""
        return self.shared.following_prefix

    # -- Celery's interface --------------------------------------------------------
    def start(self, initial_task_id: str, **kwargs: Any) -> None:
        self.consume_from(initial_task_id)

    def on_task_call(self, task_id: str) -> None:
        """``task_id`` is being sent from this thread (EtcdBackend.on_task_call); no etcd request."""
        self._flush_cancels()  # results dropped since (a thread that only sends never drains)
        self.shared.sent(task_id)

    def consume_from(self, task_id: str) -> None:
        """Follow ``task_id``: on the prefix subscription when several are awaited, else on its own key."""
        self._flush_cancels()
        with self._lock:
            if task_id in self._watches:
                return
            self._watches[task_id] = PREFIX  # claimed; replaced below by its own watch if lone
        if self.shared.attach(task_id, self):
            return
        with self._lock:  # held until the watch is recorded: _on_created must find it
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
        shared = self.shared
        with self._arrived:
            if not self._inbox and not self._to_read and not shared.reads_due():
                self._arrived.wait(timeout)
        shared.read_due()  # the prefix's reads, for every thread's consumer: posted to their inboxes
        read = self._read_confirmed()
        with self._arrived:
            batch, self._inbox = self._inbox, []
        for task_id, stored in sorted(batch, key=_revision):
            self._deliver(task_id, stored)
        for task_id, stored in sorted(read.items(), key=_revision):  # after the events: may be moot
            self._deliver(task_id, stored)
        if batch or read:
            self._flush_cancels()  # a final state just delivered: unsubscribe now, not at the next get()
            self.notify()  # another thread sharing this backend may wait on these

    # -- delivery ---------------------------------------------------------------------
    def _deliver(self, task_id: str, stored: Stored) -> None:
        if task_id not in self._watches or task_id in self._cancels:
            return  # done with it already
        seen = self._seen.get(task_id, 0)
        if stored.mod_revision <= seen:
            return  # both read and watched
        self._seen[task_id] = stored.mod_revision
        if not seen and self.on_message is not None:
            self._deliver_earlier(task_id, stored)
        self.on_state_change(self.backend.decode_result(stored.value), None)

    def _deliver_earlier(self, task_id: str, stored: Stored) -> None:
        """A caller that wants every state (``get(on_message=...)``) but whose watch began after some
        were written gets those from etcd's history first, oldest first (as Redis's subscription
        before the send would have given them)."""
        if stored.create_revision >= stored.mod_revision:
            return  # written once: nothing before it
        try:
            earlier = self.store.earlier_states(task_id, stored)
        except CONNECTION_ERRORS:
            logger.warning("etcd unreachable reading the earlier states of %s; delivering its current one", task_id)
            return
        for state in earlier:
            self.on_state_change(self.backend.decode_result(state.value), None)

    def _read_confirmed(self) -> dict[str, Stored]:
        """Read the keys whose own watch etcd confirmed since the last drain (in as few reads as etcd allows)."""
        with self._lock:
            ids = [t for t in self._to_read | self._read_later if self._watches.get(t)]
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
        self.post([(task_id, Stored.from_kv(event.kv)) for event in events])

    def _on_created(self, task_id: str) -> None:
        """etcd confirmed the watch (again, after a reconnect): a read covers what came before it."""
        with self._lock:
            self._to_read.add(task_id)
        self.notify()

    def _on_resync(self, task_id: str) -> int:
        """etcd compacted the revision the watch resumes from: read the state instead."""
        stored, revision = self.store.read(task_id)
        if stored is not None:
            self.post([(task_id, stored)])
        return revision

    def post(self, items: Sequence[Item]) -> None:
        if items:
            with self._arrived:
                self._inbox.extend(items)
                self._arrived.notify_all()

    def notify(self) -> None:
        with self._arrived:
            self._arrived.notify_all()

    def _flush_cancels(self) -> None:
        """Unsubscribe what cancel_for() queued, and drop its undelivered events."""
        done = set()
        while self._cancels:
            task_id = self._cancels.popleft()
            with self._lock:
                claimed = task_id in self._watches
                watch = self._watches.pop(task_id, None)
                self._to_read.discard(task_id)
                self._read_later.discard(task_id)
            if claimed:
                self._seen.pop(task_id, None)
                done.add(task_id)
                if watch is not None:
                    self.store.hub.unsubscribe(watch)
                self.shared.detach(task_id, self, own=watch is not None)
            else:
                self.shared.forget(task_id)  # sent and dropped, or final, before any get()
        if done:
            with self._arrived:
                self._inbox = [item for item in self._inbox if item[0] not in done]


class SharedWaits:
    """What one process awaits under one store, and the results prefix subscription serving it.

    Threads' consumers ``attach`` each awaited task: while fewer than PREFIX_MIN_AWAITED are
    awaited in the process (counting tasks sent from here and not yet collected) the consumer
    subscribes the task's own key; otherwise the task joins the prefix subscription. Covered
    tasks (``_known``) are those whose every write since a point the subscription had passed
    reaches us: sent after it was confirmed, or read after that. An awaited task not covered
    is read once (shared batch, ``read_due``) after the confirmation.
    """

    def __init__(self, store: ResultStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._consumers: dict[str, list[ResultConsumer]] = {}  # task -> consumers awaiting it on the prefix
        self._own = 0  # tasks awaited on their own subscription, all threads
        self._sent: dict[str, None] = {}  # sent from here, not awaited yet, result object alive
        self._known: dict[str, Stored | None] = {}  # covered task -> newest state seen (None: none yet)
        self._prefix: Watch | None = None
        self._live = False  # etcd confirmed the prefix subscription (and no compaction gap since)
        self._generation = 0  # which subscription the hub's callbacks belong to
        self._busy_at = 0.0  # when the process last awaited several results at once
        self._to_read: set[str] = set()  # covered tasks to read once (awaited, or sent before the prefix)
        self._read_later: set[str] = set()  # reads that failed (etcd unreachable)

    @property
    def following_prefix(self) -> bool:
        return self._prefix is not None

    def sent(self, task_id: str) -> None:
        with self._lock:
            self._sent[task_id] = None
            if len(self._sent) > MAX_REMEMBERED:
                self._sent.pop(next(iter(self._sent)))
            if self._live:
                self._remember(task_id)  # its result is written after this: an event will bring it

    def forget(self, task_id: str) -> None:
        """A result object of ``task_id`` was dropped (or its final state came) before any get() of it here."""
        with self._lock:
            self._sent.pop(task_id, None)
            if task_id not in self._consumers:  # another thread may await it
                self._known.pop(task_id, None)

    def attach(self, task_id: str, consumer: ResultConsumer) -> bool:
        """Await ``task_id`` for ``consumer``: True on the prefix subscription, False: subscribe its own key."""
        self._maybe_stop()
        item = None
        with self._lock:
            self._sent.pop(task_id, None)
            if self._own + len(self._consumers) + len(self._sent) + 1 >= PREFIX_MIN_AWAITED:
                self._busy_at = time.monotonic()
                if self._prefix is None:
                    self._start()
            if self._prefix is None:
                self._own += 1
                return False
            self._consumers.setdefault(task_id, []).append(consumer)
            if task_id in self._known:
                item = self._known[task_id]  # covered: its state so far (None: nothing written yet)
            else:
                self._remember(task_id)
                if self._live:
                    self._to_read.add(task_id)  # else read once etcd confirms the prefix
        if item is not None:
            consumer.post([(task_id, item)])
        return True

    def detach(self, task_id: str, consumer: ResultConsumer, own: bool) -> None:
        """``consumer`` stops awaiting ``task_id`` (final state, or its result object dropped)."""
        with self._lock:
            if own:
                self._own -= 1
                return
            consumers = self._consumers.get(task_id, [])
            if consumer in consumers:
                consumers.remove(consumer)
            if not consumers:
                self._consumers.pop(task_id, None)
                self._known.pop(task_id, None)
                self._to_read.discard(task_id)

    def reads_due(self) -> bool:
        """Reads to make now (failed ones are retried at the next drain, which still waits first)."""
        return bool(self._to_read)

    def read_due(self) -> None:
        """Read every covered task due for a read (for all threads), in as few reads as etcd allows."""
        with self._lock:
            ids = [t for t in self._to_read | self._read_later if t in self._known]
            self._to_read, self._read_later = set(), set()
        if not ids:
            return
        try:
            found = self.store.read_many(ids)[0]
        except CONNECTION_ERRORS:
            logger.warning("etcd unreachable reading %d result(s); reading again at the next drain", len(ids))
            with self._lock:
                self._read_later.update(ids)
            return
        by_consumer: dict[ResultConsumer, list[Item]] = {}
        with self._lock:
            for task_id, stored in found.items():
                if task_id in self._known:
                    known = self._known[task_id]
                    if known is None or known.mod_revision < stored.mod_revision:
                        self._known[task_id] = stored
                for consumer in self._consumers.get(task_id, ()):
                    by_consumer.setdefault(consumer, []).append((task_id, stored))
        for consumer, items in by_consumer.items():
            consumer.post(items)

    # -- the subscription (under self._lock) ---------------------------------------------
    def _start(self) -> None:
        self._generation += 1
        generation = self._generation
        self._prefix = self.store.hub.subscribe(
            self.store.keys.results(), lambda events: self._on_events(generation, events),
            prefix=True, puts_only=True, on_created=lambda: self._on_created(generation),
            on_resync=lambda: self._on_resync(generation), label=HUB_LABEL)

    def _remember(self, task_id: str) -> None:
        self._known.setdefault(task_id, None)
        if len(self._known) > MAX_REMEMBERED:
            oldest = next(iter(self._known))
            if oldest not in self._consumers:  # an awaited one stays covered
                del self._known[oldest]

    def _maybe_stop(self) -> None:
        """Back to per-task subscriptions once nobody awaits on the prefix and the process was not busy lately."""
        with self._lock:
            watch = self._detach_if_idle()
        if watch is not None:
            self.store.hub.unsubscribe(watch)

    def _detach_if_idle(self) -> Watch | None:
        if self._prefix is None or self._consumers or time.monotonic() - self._busy_at < PREFIX_LINGER:
            return None
        watch, self._prefix, self._live = self._prefix, None, False
        self._generation += 1
        self._known.clear()  # sent tasks are read when awaited, as without the prefix
        self._to_read, self._read_later = set(), set()
        return watch

    # -- the hub's thread ----------------------------------------------------------------
    def _on_events(self, generation: int, events: Sequence[Any]) -> None:
        task_id_of = self.store.keys.task_id_of_result
        by_consumer: dict[ResultConsumer, list[Item]] = {}
        with self._lock:
            if generation != self._generation:
                return
            for event in events:
                task_id = task_id_of(event.kv.key)
                if task_id not in self._known:
                    continue  # another process's task (or one sent here and dropped)
                stored = self._known[task_id] = Stored.from_kv(event.kv)
                for consumer in self._consumers.get(task_id, ()):
                    by_consumer.setdefault(consumer, []).append((task_id, stored))
            idle = self._detach_if_idle()  # a process that stopped awaiting stops receiving every result
        for consumer, items in by_consumer.items():
            consumer.post(items)
        if idle is not None:
            self.store.hub.unsubscribe(idle)  # safe here: the stream calls back without its lock

    def _on_created(self, generation: int) -> None:
        """etcd confirmed the subscription (again): read its waiters, and tasks sent before it, once."""
        with self._lock:
            if generation != self._generation:
                return
            self._live = True
            ahead = [t for t in self._sent if t not in self._known][-MAX_READ_AHEAD:]
            for task_id in ahead:
                self._remember(task_id)
            self._to_read.update(self._consumers, ahead)
            consumers = {consumer for waiting in self._consumers.values() for consumer in waiting}
        for consumer in consumers:
            consumer.notify()

    def _on_resync(self, generation: int) -> int:
        """etcd compacted the revision to resume from: the re-confirmation reads the waiters again."""
        with self._lock:
            if generation == self._generation:
                self._live = False
                self._known = {task_id: None for task_id in self._consumers}
        return self.store.current_revision()


_shared = forking.PerProcess()


def shared_waits(store: ResultStore) -> SharedWaits:
    """The process's :class:`SharedWaits` for ``store`` (stores are per process: a child gets new ones)."""
    return _shared.get((store.config, store.keys.root), lambda: SharedWaits(store),
                       usable=lambda waits: waits.store is store)  # a store made anew (close_shared) waits anew


def _revision(item: Item) -> int:
    return item[1].mod_revision
