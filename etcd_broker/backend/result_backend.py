"""Celery result backend on etcd v3: results pushed through watches, progress, task streams.

``result_backend = "etcdv3://host:2379"`` once ``etcd_broker`` is imported (or through the
``celery.result_backends`` entry point). Options come from the URL and from
``result_backend_transport_options``: ``prefix``, ``user``, ``password``, ``ca_cert``,
``cert_key``, ``cert_cert``, ``timeout`` (the transport's). Key layout and guarantees:
docs/results.md. As in Celery's ``celery/backends/redis.py``, the backend and its
``ResultConsumer`` live together; the bytes in etcd are result_store.py's. Sections:

- *deferred*: :class:`DeferredStarted`, STARTED written only for tasks still running after a delay.
- *result_consumer*: :class:`ResultConsumer`: ``get()`` wakes on the put (a subscription per task,
  or :class:`SharedWaits`' one on the results prefix when a process awaits many).
- *result_backend*: :class:`EtcdBackend` (writes, chords, cancellation), ``watch_task``, ``follow_task``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from celery import current_app, current_task, maybe_signature, states
from celery.backends.asynchronous import AsyncBackendMixin, BaseResultConsumer
from celery.backends.base import Backend, BaseKeyValueStoreBackend
from celery.exceptions import ChordError, Ignore, ImproperlyConfigured
from celery.exceptions import TimeoutError as CeleryTimeoutError
from celery.result import GroupResult, allow_join_result
from kombu.utils.encoding import bytes_to_str, ensure_bytes
from kombu.utils.functional import retry_over_time

from etcd_broker import compat
from etcd_broker.backend.result_store import (
    CHORD_CLAIM_TTL,
    ChordClaim,
    ResultStore,
    Stored,
    WriteOutcome,
    store_for,
)
from etcd_broker.backend.task_events import TaskEvent, TaskStream, iter_events
from etcd_broker.core.client import (
    CONNECTION_ERRORS,
    ETCD_OPTIONS,
    ChildLock,
    EtcdConfig,
    PerProcess,
    reset_in_child,
)
from etcd_broker.core.ops import DEFAULT_PREFIX, KeySpace
from etcd_broker.core.watch import Watch
from etcd_broker.exceptions import EtcdConfigError, EtcdNoSpace
from etcd_broker.transport.consumer import settled_by_result, take_for_result

# -------------------- deferred: STARTED written only for tasks still running after a short delay
#   (``started_delay``).
#
# Celery's ``task_track_started`` writes STARTED before every task body: for a job of a few
# milliseconds that is one etcd proposal (a Raft entry and a disk sync) that nobody sees, since
# SUCCESS replaces it at once. Here the running task's STARTED is held back; a timer thread writes
# it once the task has run ``delay`` seconds, and any later state of the task (PROGRESS, SUCCESS,
# FAILURE...) drops it first. A per-task lock keeps the order: a held STARTED that is being written
# finishes before that later state is written, so STARTED never lands after it.

logger = logging.getLogger(__name__)


class _Held:
    """One held STARTED: the write to run, and a lock that orders it before the task's next state."""

    __slots__ = ("write", "lock", "dropped")

    def __init__(self, write: Callable[[], object]) -> None:
        self.write = write
        self.lock = threading.Lock()
        self.dropped = False


class DeferredStarted:
    """Per-process timer of held STARTED writes (a fork starts its own thread on first use)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self._held: dict[str, _Held] = {}
        self._heap: list[tuple[float, int, str, _Held]] = []
        self._order = itertools.count()
        # its lock is unlocked again in a forked child (a thread holding it did not follow)
        self._wake = threading.Condition(ChildLock())
        self._pid = 0
        reset_in_child(self, DeferredStarted._forget)

    def _forget(self) -> None:
        """In a forked child: the parent's held writes (and their locks) are not ours; the timer
        thread starts again on first use."""
        self._held = {}
        self._heap = []
        self._pid = 0

    def hold(self, task_id: str, write: Callable[[], object]) -> None:
        """Run ``write`` after :attr:`delay` unless :meth:`drop` comes first."""
        held = _Held(write)
        with self._wake:
            self._start_if_needed()
            self._held[task_id] = held
            heapq.heappush(self._heap, (time.monotonic() + self.delay, next(self._order), task_id, held))
            self._wake.notify()

    def drop(self, task_id: str) -> None:
        """The task writes another state: its held STARTED is dropped (or finishes writing first)."""
        with self._wake:
            held = self._held.pop(task_id, None)
        if held is not None:
            with held.lock:
                held.dropped = True

    def _start_if_needed(self) -> None:
        if self._pid != os.getpid():  # new process (or a fork): the parent's thread is not ours
            self._pid = os.getpid()
            self._held.clear()
            self._heap.clear()
            threading.Thread(target=self._loop, name="etcd-started", daemon=True).start()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._heap or self._heap[0][0] > time.monotonic():
                    self._wake.wait(self._heap[0][0] - time.monotonic() if self._heap else None)
                _, _, task_id, held = heapq.heappop(self._heap)
            self._write(task_id, held)  # still in _held while writing: a drop() waits for it

    def _write(self, task_id: str, held: _Held) -> None:
        with held.lock:
            if not held.dropped:
                held.dropped = True
                try:
                    held.write()
                except Exception:  # noqa: BLE001 - a lost STARTED must not kill the timer; the task goes on
                    logger.warning("STARTED of task %s not written", task_id, exc_info=True)
        with self._wake:
            if self._held.get(task_id) is held:
                del self._held[task_id]


# -------------------- result_consumer: Celery's async result consumer fed by etcd watch events: get() wakes
#   on the put, never polls.
#
# Follows celery.backends.redis.ResultConsumer. Celery gives each thread its own backend and
# consumer; what they await is followed on the process's watch hub (watch.py) in one of two ways:
#
# * a lone waiter subscribes its own task's key from now and reads it once etcd confirms the
#   subscription: the process receives the writes of that task and nothing else;
# * while the process awaits several results at once (in get(), or sent from here and still
#   held), one subscription of the whole results prefix (:class:`SharedWaits`, one per process
#   and store) serves every thread: writes of other processes' tasks are dropped here. A task
#   sent after that subscription was confirmed needs no read (its result is written later, so
#   it arrives as an event); the others are read once after the confirmation, in shared batches.
#
# Events go into each consumer's inbox; ``drain_events`` empties it in the waiting thread,
# blocking on a condition variable meanwhile.


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
        reset_in_child(self, ResultConsumer._reset)

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


_shared = PerProcess()


def shared_waits(store: ResultStore) -> SharedWaits:
    """The process's :class:`SharedWaits` for ``store`` (stores are per process: a child gets new ones)."""
    return _shared.get((store.config, store.keys.root), lambda: SharedWaits(store),
                       usable=lambda waits: waits.store is store)  # a store made anew (close_shared) waits anew


def _revision(item: Item) -> int:
    return item[1].mod_revision


# -------------------- result_backend: EtcdBackend, Celery's result backend


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
        ack_key = take_for_result(task_id, self.store.client) if success and settle_ack else None  # acks_late
        outcome = self._ensure(self.store.write_state, task_id, ensure_bytes(self.encode(meta)),
                               ttl=self.expires, success=success, check_cancel=progress_point, ack_key=ack_key)
        if outcome is WriteOutcome.CANCELLED:
            self._stop(task_id)
        elif outcome is WriteOutcome.WRITTEN_ACKED:
            settled_by_result(task_id)

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
        transaction where this process holds it (consumer.py).
        """
        writes = []
        for task_id, result, request in done:
            meta = self._get_result_meta(result=self.encode_result(result, states.SUCCESS),
                                         state=states.SUCCESS, traceback=None, request=request)
            meta["task_id"] = task_id
            self.started.drop(task_id)
            writes.append((task_id, ensure_bytes(self.encode(meta)), take_for_result(task_id, self.store.client)))
        outcomes = self._ensure(self.store.write_successes, writes, ttl=self.expires)
        for (task_id, _, _), outcome in zip(writes, outcomes, strict=True):
            if outcome is WriteOutcome.WRITTEN_ACKED:
                settled_by_result(task_id)

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
