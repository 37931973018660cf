"""What the transport knows about its queues between reads: watches, hints and known-empty queues.

One watch per consumed queue (on the process's watch hub) wakes the transport on every put.
After a read that saw a whole queue, the puts seen since are kept as hints (claimable without a
range read) and the queue is known empty until a put arrives. Once every hint taken has been
claimed (by us or by others), the queue is known empty again as of the last put seen, so a lone
message costs its claim and no range read. A reconnect forgets it all.

A put offered to another consumer (offers.py) is held back for the offer's grace: it is neither
a hint nor news of the queue until then, and a range read skips it. If its delete (a claim by
anyone) comes first it is forgotten; else it becomes a hint like any put, and we claim it.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from functools import partial
from time import monotonic

from etcd_broker import offers
from etcd_broker.watch import EVENT_DELETE

logger = logging.getLogger(__name__)

#: Most messages claimed in one transaction (2 ops each; etcd allows 128 ops per txn); also the
#: most put events kept as hints for a queue known empty.
CLAIM_BATCH = 32


class QueueWatchMixin:
    """The queue watches and read bookkeeping of :class:`etcd_broker.transport.Transport`.

    Needs ``watch_hub``, ``etcd``, ``keys``, ``config``, ``lease`` and ``wake()`` from the class it is mixed into.
    """

    def _init_queue_watch(self) -> None:
        self._queue_watches: dict[str, list] = {}  # queue -> [watch, consumers]
        self._hints: dict[str, list | None] = {}
        self._read_revision: dict[str, int] = {}
        self._forgotten_at = monotonic()
        self._event_revision: dict[str, int] = {}
        self._reads_generation = 0  # bumped by forget_reads: hints taken before it prove nothing
        self._watch_lock = threading.Lock()
        self._held: dict[str, dict[bytes, tuple[bytes, bytes, int]]] = {}  # queue -> puts offered elsewhere
        self._held_order: dict[str, tuple[deque, deque]] = {}  # queue -> by rank 1, 2: (grace end, key)
        self._grace_armed: dict[str, float] = {}  # queue -> earliest grace end a timer is set for

    def _unwatch_all(self) -> None:
        """Drop every queue watch (the connection is closing)."""
        with self._watch_lock:
            queues, watches = list(self._queue_watches), [entry[0] for entry in self._queue_watches.values()]
            self._queue_watches = {}
            self._held.clear()
            self._held_order.clear()
            self._grace_armed.clear()
        for watch in watches:
            self.watch_hub.unsubscribe(watch)
        for queue in queues:
            offers.local_consumers().discard(self._local_key(queue), self)

    def watch_queue(self, queue: str) -> None:
        """Wake :meth:`drain_events` whenever a message is put on ``queue``."""
        with self._watch_lock:
            entry = self._queue_watches.get(queue)
            if entry is not None:
                entry[1] += 1
                return
            # deletes too: a claim's delete settles the offer of its put (offers.py)
            watch = self.watch_hub.subscribe(self.keys.ready(queue), partial(self._on_ready, queue), prefix=True,
                                             on_created=self.forget_reads)
            self._queue_watches[queue] = [watch, 1]
        offers.local_consumers().add(self._local_key(queue), self)
        self.watch_hub.wait_created(watch, timeout=self.config.timeout)
        self.wake()

    def unwatch_queue(self, queue: str) -> bool:
        """One consumer of ``queue`` less; True if it was the last (the watch is gone)."""
        with self._watch_lock:
            entry = self._queue_watches.get(queue)
            if entry is None:
                return False
            entry[1] -= 1
            if entry[1] > 0:
                return False
            del self._queue_watches[queue]
            self._held.pop(queue, None)
            self._held_order.pop(queue, None)
            self._grace_armed.pop(queue, None)
        self.watch_hub.unsubscribe(entry[0])
        offers.local_consumers().discard(self._local_key(queue), self)
        return True

    def _local_key(self, queue: str) -> tuple[int, str]:
        """Transports share a consumer lease when they share the client (membership.consumer_lease)."""
        return id(self.etcd), self.keys.ready(queue)

    def _offered_here(self, queue: str):
        """``offered(key)``: is a put of ``key`` on ``queue`` offered to us now (offers.py)?"""
        lease = self.lease
        lease_id = lease.lease_id
        leases = lease.members.of(queue) if lease_id is not None else None
        local = offers.local_consumers().of(self._local_key(queue))
        return partial(offers.offer_rank, leases=leases, lease=lease_id, local=local, me=self)

    def _on_ready(self, queue: str, events) -> None:
        rank_of = self._offered_here(queue)
        now = monotonic()
        news, earliest = [], None
        with self._watch_lock:
            if queue not in self._queue_watches:  # unwatched meanwhile (a late callback)
                return
            held = self._held.setdefault(queue, {})
            for event in events:
                kv = event.kv
                if event.type == EVENT_DELETE:  # claimed (or purged): nobody need try it again
                    held.pop(kv.key, None)
                    hints = self._hints.get(queue)
                    if hints:
                        self._hints[queue] = [row for row in hints if row[0] != kv.key]
                    continue
                rank = rank_of(kv.key)
                if not rank:
                    news.append((kv.key, kv.value, kv.mod_revision))
                    continue
                due = now + rank * offers.OFFER_GRACE_SECONDS
                held[kv.key] = (kv.key, kv.value, kv.mod_revision)
                self._held_order.setdefault(queue, (deque(), deque()))[rank - 1].append((due, kv.key))
                earliest = due if earliest is None else min(earliest, due)
            arm = earliest is not None and self._arm(queue, earliest, now)
            if news:
                self._add_news(queue, news)
        if arm:
            offers.timer().call_at(earliest, partial(self._grace_over, queue))
        if news:
            self.wake()

    def _arm(self, queue: str, due: float, now: float) -> bool:
        """True if a grace callback must be set for ``due``: none set covers it (called under the lock)."""
        armed = self._grace_armed.get(queue)
        if armed is not None and now < armed <= due:
            return False
        self._grace_armed[queue] = due
        return True

    def _add_news(self, queue: str, rows: list) -> None:
        """Puts we may claim now: hints, and the queue is not known empty (called under the lock)."""
        self._event_revision[queue] = max(self._event_revision.get(queue, 0), max(row[2] for row in rows))
        hints = self._hints.get(queue)
        if hints is not None and len(hints) + len(rows) <= CLAIM_BATCH:
            hints.extend(rows)
        else:
            self._hints[queue] = None
            self._read_revision.pop(queue, None)  # a put held back may be older than our last read

    def _grace_over(self, queue: str) -> None:
        """On the offers timer: puts offered elsewhere whose grace ended unclaimed are ours to try."""
        now = monotonic()
        with self._watch_lock:
            orders, held, rows = self._held_order.get(queue, ()), self._held.get(queue) or {}, []
            for order in orders:
                while order and order[0][0] <= now:
                    row = held.pop(order.popleft()[1], None)
                    if row is not None:
                        rows.append(row)
            if rows:
                self._add_news(queue, sorted(rows))
            due = min((order[0][0] for order in orders if order), default=None)
            arm = due is not None and self._arm(queue, due, now)
        if arm:
            offers.timer().call_at(due, partial(self._grace_over, queue))
        if rows:
            logger.debug("%d put(s) on queue %r not claimed by their owner within the grace", len(rows), queue)
            self.wake()

    def skip_held(self, queue: str, rows: list) -> list:
        """``rows`` of a range read without the puts offered to another consumer, in their grace."""
        with self._watch_lock:
            held = self._held.get(queue)
            return [row for row in rows if row[0] not in held] if held else rows

    def after_read(self, queue: str, revision: int, drained: bool) -> None:
        """After a range read at ``revision``: if it saw the whole queue, new messages come by watch.

        Hints start only if no put after ``revision`` was seen before this call (its event would
        be missing from them); the queue is not known empty then either.
        """
        with self._watch_lock:
            complete = drained and self._event_revision.get(queue, 0) <= revision
            self._hints[queue] = [] if complete else None
            if drained:
                self._read_revision[queue] = revision
            else:
                self._read_revision.pop(queue, None)

    def unread(self, queue: str) -> None:
        """Messages may wait that no hint names (a claim left some): the next get reads the queue."""
        with self._watch_lock:
            self._hints[queue] = None
            self._read_revision.pop(queue, None)

    def known_empty(self, queue: str) -> bool:
        """True if a read found ``queue`` empty and no put has been seen since (no need to read)."""
        with self._watch_lock:
            read = self._read_revision.get(queue)
            return read is not None and self._event_revision.get(queue, 0) <= read

    def forget_reads(self) -> None:
        """Trust nothing remembered about queue contents (after a reconnect, or as a safety net)."""
        with self._watch_lock:
            self._read_revision.clear()
            self._reads_generation += 1
            self._forgotten_at = monotonic()
        self.wake()

    def take_hints(self, queue: str) -> tuple[list, tuple[int, int]] | None:
        """Messages seen arriving on a queue known to be empty: claimable without a range read.

        Returns the hints (every put since the queue was last known empty, in queue order) and a
        token for :meth:`hints_settled`.
        """
        with self._watch_lock:
            hints = self._hints.get(queue)
            if not hints:
                return None
            self._hints[queue] = []
            token = (self._event_revision.get(queue, 0), self._reads_generation)
        return sorted(hints), token

    def hints_settled(self, queue: str, token: tuple[int, int]) -> None:
        """Every hint :meth:`take_hints` gave is claimed, by us or by others: the queue is known
        empty again as of the last put those hints include (later puts are hints of their own)."""
        revision, generation = token
        with self._watch_lock:
            if generation == self._reads_generation and self._hints.get(queue) is not None:
                self._read_revision[queue] = revision

