"""One consumer offered each message: which consumer of a queue claims a put first (issue 19).

Every consumer's watch sees every put on its queues. Without a rule each one races to claim it
and all claim transactions but one fail (each a raft proposal, a disk write). Here a put is
*offered* to one consumer, chosen from its key alone, so that every consumer agrees without a
word exchanged:

* across processes: the queue's live consumer leases, sorted (membership.py follows
  ``consumer/``, whose values list the queues each lease consumes); the lease at
  ``crc32(key) mod N``;
* within that process: the transports consuming the queue, in the order they started; the one at
  ``(crc32(key) // N) mod M``.

The others hold the put and claim it only if no delete of it came by then (the owner is full,
slow or gone, queue_watch.py): its backups (the next transport of the owner's lease, the chosen
transport of the next lease) for OFFER_GRACE_SECONDS, the rest for twice that. So a message
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
import weakref
import zlib
from collections.abc import Callable, Iterable, Sequence
from itertools import count
from time import monotonic
from typing import Any

from etcd_broker import forking
from etcd_broker.watch import EVENT_DELETE

logger = logging.getLogger(__name__)

#: Seconds a put offered to another consumer waits before its backups may claim it (the others wait
#: twice that): a few times a claim's p50 on a loaded 2-core host (5-15 ms), so an owner that can take
#: it nearly always has by then (at 30 ms, load 20, about 4% of owners were still late).
OFFER_GRACE_SECONDS = 0.05
#: The rank of the consumers that wait two graces (neither the owner nor one of its backups).
MAX_RANK = 2


def offer_rank(key: bytes, leases: Sequence[int] | None, lease: int | None, local: Sequence[Any], me: Any) -> int:
    """How long transport ``me`` (of consumer lease ``lease``) waits before it claims a put of ``key``:
    0 (the owner: at once), 1 (a backup: one grace) or 2 (the others: two graces).

    ``leases``: the queue's live consumer leases, sorted (None, or without ``lease``: not known,
    every lease counts as ours); ``local``: this process's transports consuming the queue under
    ``lease``, in order (without ``me``: not known, ours). The backups are the next transport of
    the owner's lease and the chosen transport of the next lease, so an owner that is late or
    full races one or two consumers, not all of them.
    """
    spread = zlib.crc32(key)  # the same in every process (hash() of bytes is salted per process)
    lease_rank = 0
    if leases and lease in leases:
        index = leases.index(lease)
        lease_rank = _rank(index, spread, len(leases))
        spread //= len(leases)
    local_rank = _rank(local.index(me), spread, len(local)) if me in local else 0
    return min(lease_rank + local_rank, MAX_RANK)


def _rank(index: int, spread: int, count: int) -> int:
    """0 for the member at ``spread mod count``, 1 for the one after it, 2 for the rest."""
    return min((index - spread) % count, MAX_RANK)


def lease_of_consumer_key(key: bytes) -> int:
    """The lease id of a ``consumer/<lease hex>`` key."""
    return int(key.decode().rsplit("/", 1)[1], 16)


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
        queues = {lease_of_consumer_key(kv.key): _queues_of(kv.value) for kv in kvs}
        with self._lock:
            self._queues, self._revision, self._sorted = queues, revision, {}

    def apply(self, events: Iterable[Any]) -> None:
        with self._lock:
            if self._revision is None:
                return
            for event in events:
                if event.kv.mod_revision <= self._revision:  # the read already holds it
                    continue
                lease = lease_of_consumer_key(event.kv.key)
                if event.type == EVENT_DELETE:
                    self._queues.pop(lease, None)
                else:
                    self._queues[lease] = _queues_of(event.kv.value)
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


def _queues_of(value: bytes) -> frozenset[str]:
    try:
        return frozenset(json.loads(value).get("queues", ()))
    except (ValueError, AttributeError):
        return frozenset()


class LocalConsumers:
    """This process's transports consuming each queue under one lease, in the order they started
    (keyed by the transports' client and the queue's ``ready/`` prefix)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: dict[tuple, list[weakref.ref]] = {}

    def add(self, queue: tuple, transport: Any) -> None:
        with self._lock:
            refs = self._queues.setdefault(queue, [])
            if not any(ref() is transport for ref in refs):
                refs.append(weakref.ref(transport))

    def discard(self, queue: tuple, transport: Any) -> None:
        with self._lock:
            refs = [ref for ref in self._queues.get(queue, ()) if ref() is not None and ref() is not transport]
            if refs:
                self._queues[queue] = refs
            else:
                self._queues.pop(queue, None)

    def of(self, queue: tuple) -> list[Any]:
        with self._lock:
            return [t for ref in self._queues.get(queue, ()) if (t := ref()) is not None]


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


_per_process = forking.PerProcess()


def local_consumers() -> LocalConsumers:
    """This process's :class:`LocalConsumers` (a new one in a forked child)."""
    return _per_process.get(("local",), LocalConsumers)


def timer() -> Timer:
    """This process's :class:`Timer` (a new one in a forked child: the thread did not follow)."""
    return _per_process.get(("timer",), Timer)
