"""One consumer offered each message: which consumer of a queue claims a put first (issue 19).

Every consumer's watch sees every put on its queues. Without a rule each one races to claim it
and all claim transactions but one fail (each a raft proposal, a disk write). Here a put is
*offered* to one consumer, chosen from its key alone, so that every consumer agrees without a
word exchanged:

* across processes: the queue's live consumer leases, sorted (consumer.py follows
  ``consumer/``, whose values list the queues each lease consumes); the lease at
  ``crc32(key) mod N``;
* within that process: the transports consuming the queue, in the order they started; the one at
  ``(crc32(key) // N) mod M``.

The others claim it only if no delete of it came by then (the owner is full, slow or gone): its
backups (the next transport of the owner's lease, the chosen transport of the next lease) after
OFFER_GRACE_SECONDS, the rest after twice that; until then the process's :class:`QueueFeed`
(its one watch on the queue) holds the put back from them. So a message
waits at most a grace and a claim when a backup can take it, and a late owner races one or two
consumers, not all of them. Nothing new is written and the claim transaction still
decides, so exactly-once is unchanged. A consumer that does not know a queue's members yet (its
view of ``consumer/`` is not read, or does not list its own lease) claims at once, as before.
"""
from __future__ import annotations

import heapq
import json
import logging
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from itertools import count
from time import monotonic
from typing import Any

from etcd_broker.core.client import PerProcess
from etcd_broker.core.ops import KeySpace
from etcd_broker.core.watch import EVENT_DELETE

logger = logging.getLogger(__name__)

#: Seconds a put offered to another consumer waits before its backups may claim it (the others wait
#: twice that): a few times a claim's p50 on a loaded 2-core host (5-15 ms), so an owner that can take
#: it nearly always has by then (at 30 ms, load 20, about 4% of owners were still late).
OFFER_GRACE_SECONDS = 0.05


def place(key: bytes, leases: Sequence[int] | None, lease: int | None, count: int) -> tuple[int, int]:
    """Where the put of ``key`` is offered, seen from a process whose consumer lease is ``lease``
    and which has ``count`` transports consuming the queue: (lease rank, local index).

    Lease rank 0: this process owns it (its transport at the local index claims at once); 1: this
    process is the owner's backup (its transport at the local index claims after a grace); 2:
    neither. ``leases``: the queue's live consumer leases, sorted (None, or without ``lease``: not
    known, every lease counts as ours).
    """
    spread = zlib.crc32(key)  # the same in every process (hash() of bytes is salted per process)
    lease_rank = 0
    if leases and lease in leases:
        lease_rank = min((leases.index(lease) - spread) % len(leases), 2)
        spread //= len(leases)
    return lease_rank, spread % count


class Members:
    """Which live consumer leases consume which queues, from the ``consumer/`` keys' values.

    Read once each time the consumer watch is created (:meth:`reset`), then kept by its events
    (:meth:`apply`); until the first read nothing is known and :meth:`of` says None.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[int, frozenset[str]] = {}  # lease -> the queues its consumer key lists
        self._revision: int | None = None  # the read the view starts from (events up to it are in it)
        self._sorted: dict[str, list[int]] = {}  # queue -> its leases, sorted (a cache)

    def reset(self, kvs: Iterable[Any], revision: int) -> None:
        queues = {KeySpace.lease_of_consumer(kv.key): queues_of(kv.value) for kv in kvs}
        with self._lock:
            self._queues, self._revision, self._sorted = queues, revision, {}

    def apply(self, events: Iterable[Any]) -> None:
        with self._lock:
            if self._revision is None:
                return
            for event in events:
                if event.kv.mod_revision <= self._revision:  # the read already holds it
                    continue
                lease = KeySpace.lease_of_consumer(event.kv.key)
                if event.type == EVENT_DELETE:
                    self._queues.pop(lease, None)
                else:
                    self._queues[lease] = queues_of(event.kv.value)
                self._sorted = {}

    def of(self, queue: str) -> list[int] | None:
        """The live leases consuming ``queue``, sorted; None until the view is read."""
        with self._lock:
            if self._revision is None:
                return None
            leases = self._sorted.get(queue)
            if leases is None:
                leases = self._sorted[queue] = sorted(lease for lease, queues in self._queues.items()
                                                      if queue in queues)
            return leases


def queues_of(value: bytes) -> frozenset[str]:
    """The queues a ``consumer/`` key's value lists (none, for a value that is not ours)."""
    try:
        return frozenset(json.loads(value).get("queues", ()))
    except (ValueError, AttributeError):
        return frozenset()


class QueueFeed:
    """This process's one watch on one queue's ``ready/`` for its transports that consume it under one
    consumer lease, and the puts it holds back for them.

    A put goes at once to the transport it is offered to (if this process owns it); else it is
    held: after one grace to this process's backup transport (the next one of the owner's
    process, or the chosen one of the owner's backup process), after two to every other one,
    unless its delete came first. So each process decodes each put and delete once, whatever
    the number of its transports, and a transport is called only for the puts it may claim.
    Transports: ``lease``, ``forget_reads()``, ``offer_news(queue, rows)``, ``drop_hints(queue, keys)``.
    """

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.watch: Any = None
        self._lock = threading.Lock()
        self._transports: list[Any] = []
        self._held: dict[bytes, tuple[tuple, set[int]]] = {}  # key -> (row, ids of the transports given it)
        self._stages: tuple[deque, deque] = (deque(), deque())  # after 1, 2 graces: (due, key, transports, last)
        self._armed: float | None = None  # the earliest due a timer callback is set for

    def join(self, transport: Any) -> bool:
        """Add ``transport``; True if it is the first (the caller subscribes the watch)."""
        with self._lock:
            if transport not in self._transports:
                self._transports.append(transport)
            return len(self._transports) == 1

    def leave(self, transport: Any) -> bool:
        """Remove ``transport``; True if it was the last (the caller unsubscribes the watch)."""
        with self._lock:
            self._transports = [t for t in self._transports if t is not transport]
            if self._transports:
                return False
            self._held.clear()
            for stage in self._stages:
                stage.clear()
            return True

    def transports(self) -> list[Any]:
        with self._lock:
            return list(self._transports)

    def is_held(self, key: bytes, transport: Any) -> bool:
        """True while ``key`` is held back from ``transport`` (offered to another, in its grace)."""
        entry = self._held.get(key)
        return entry is not None and id(transport) not in entry[1]

    def on_created(self) -> None:
        for transport in self.transports():
            transport.forget_reads()

    def on_events(self, events: Sequence[Any]) -> None:
        transports = self.transports()
        if not transports:
            return
        lease = transports[0].lease
        lease_id = lease.lease_id
        leases = lease.members.of(self.queue) if lease_id is not None else None
        now, count = monotonic(), len(transports)
        news: dict[int, list] = {}
        deleted: list[bytes] = []
        earliest = None
        with self._lock:
            for event in events:
                kv = event.kv
                if event.type == EVENT_DELETE:  # claimed (or purged): nobody here need try it
                    self._held.pop(kv.key, None)
                    deleted.append(kv.key)
                    continue
                row = (kv.key, kv.value, kv.mod_revision)
                lease_rank, index = place(kv.key, leases, lease_id, count)
                if lease_rank == 0:
                    news.setdefault(index, []).append(row)
                    first, backup = {index}, [(index + 1) % count] if count > 1 else []
                elif lease_rank == 1:
                    first, backup = set(), [index]
                else:
                    first, backup = set(), []
                rest = [transports[i] for i in range(count) if i not in first and i not in backup]
                if not backup and not rest:
                    continue
                self._held[kv.key] = (row, {id(transports[i]) for i in first})
                due = now + (OFFER_GRACE_SECONDS if backup else 2 * OFFER_GRACE_SECONDS)
                if backup:  # the last stage of a put forgets it
                    self._stages[0].append((due, kv.key, [transports[i] for i in backup], not rest))
                if rest:
                    self._stages[1].append((now + 2 * OFFER_GRACE_SECONDS, kv.key, rest, True))
                earliest = due if earliest is None else min(earliest, due)
            arm = earliest is not None and self._arm(earliest, now)
        for index, rows in news.items():
            transports[index].offer_news(self.queue, rows)
        if deleted:
            for transport in transports:
                transport.drop_hints(self.queue, deleted)
        if arm:
            timer().call_at(earliest, self._grace_over)

    def _arm(self, due: float, now: float) -> bool:
        """True if a timer callback must be set for ``due``: none set covers it (called under the lock)."""
        if self._armed is not None and now < self._armed <= due:
            return False
        self._armed = due
        return True

    def _grace_over(self) -> None:
        """On the offers timer: held puts whose grace ended unclaimed go to their next transports."""
        now = monotonic()
        given: dict[int, tuple[Any, list]] = {}
        with self._lock:
            for stage in self._stages:
                while stage and stage[0][0] <= now:
                    _, key, targets, last = stage.popleft()
                    entry = self._held.pop(key, None) if last else self._held.get(key)
                    if entry is None:
                        continue
                    entry[1].update(id(transport) for transport in targets)
                    for transport in targets:
                        given.setdefault(id(transport), (transport, []))[1].append(entry[0])
            due = min((stage[0][0] for stage in self._stages if stage), default=None)
            arm = due is not None and self._arm(due, now)
        if arm:
            timer().call_at(due, self._grace_over)
        for transport, rows in given.values():
            logger.debug("%d put(s) on queue %r not claimed by their owner within the grace", len(rows), self.queue)
            transport.offer_news(self.queue, sorted(rows))


class Feeds:
    """This process's :class:`QueueFeed` s, by client (one consumer lease each) and queue prefix."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._feeds: dict[tuple, QueueFeed] = {}

    def join(self, key: tuple, queue: str, transport: Any, subscribe: Callable[[QueueFeed], Any]) -> QueueFeed:
        """The feed of ``key`` with ``transport`` in it; the first one's watch is ``subscribe(feed)``."""
        with self._lock:
            feed = self._feeds.get(key)
            if feed is None:
                feed = self._feeds[key] = QueueFeed(queue)
            if feed.join(transport):
                feed.watch = subscribe(feed)
            return feed

    def leave(self, key: tuple, transport: Any) -> Any:
        """Take ``transport`` out of its feed; the feed's watch if it was the last (to unsubscribe)."""
        with self._lock:
            feed = self._feeds.get(key)
            if feed is None or not feed.leave(transport):
                return None
            del self._feeds[key]
            return feed.watch


class Timer:
    """One thread that runs short callbacks when they are due (the end of an offer's grace)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._order = count()
        self._thread: threading.Thread | None = None

    def call_at(self, due: float, callback: Callable[[], None]) -> None:
        """Run ``callback()`` on the timer thread at monotonic time ``due``."""
        with self._cond:
            heapq.heappush(self._heap, (due, next(self._order), callback))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="etcd-offers", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap or self._heap[0][0] > monotonic():
                    self._cond.wait(None if not self._heap else self._heap[0][0] - monotonic())
                _, _, callback = heapq.heappop(self._heap)
            try:
                callback()
            except Exception:  # noqa: BLE001 - the timer serves every transport of the process
                logger.exception("offer grace callback %r failed", callback)


_per_process = PerProcess()


def feeds() -> Feeds:
    """This process's :class:`Feeds` (a new one in a forked child)."""
    return _per_process.get(("feeds",), Feeds)


def timer() -> Timer:
    """This process's :class:`Timer` (a new one in a forked child: the thread did not follow)."""
    return _per_process.get(("timer",), Timer)
