"""What the transport knows about its queues between reads: watches, hints and known-empty queues.

One watch per consumed queue (on the process's watch hub) wakes the transport on every put.
After a read that saw a whole queue, the puts seen since are kept as hints (claimable without a
range read) and the queue is known empty until a put arrives. Once every hint taken has been
claimed (by us or by others), the queue is known empty again as of the last put seen, so a lone
message costs its claim and no range read. A reconnect forgets it all.

Head cursors (issue 19): etcd visits every key of a range read, live or deleted and not yet
compacted, so a read of the whole ``ready/`` prefix walks the backlog and the tombstones of
what was claimed. Per watched queue we keep the lowest ready key that may still be live: a read
that finds the head raises it there; every put the watch hands us (publishes, requeues and
restores, which go back to their original lower place) lowers it to its key, also one seen
while a read was under way; :meth:`forget_reads` (a reconnect or a compacted watch, and a 30 s
safety re-check the stream did not answer, event_loop.py) drops it, so the next read is of the
whole prefix again. No timer forgets it otherwise: a put below the cursor (a requeue, a dead
consumer's message swept back) lowers it by its own event. The transport reads from the cursor
(channel.py ``_read_ready``).

The watch is the process's, shared by its transports on the queue (offers.QueueFeed): a put
reaches the one transport it is offered to at once; one offered elsewhere is held back by the
feed for the offer's grace (neither a hint nor news of the queue until then, and a range read
skips it). If its delete (a claim by anyone) comes first it is forgotten; else it becomes a
hint like any put, and we claim it.
"""
from __future__ import annotations

import itertools
import logging
import threading
from time import monotonic

from etcd_broker.transport import offers

logger = logging.getLogger(__name__)

#: Most messages claimed in one transaction (2 ops each; etcd allows 128 ops per txn); also the
#: most put events kept as hints for a queue known empty.
CLAIM_BATCH = 32


class QueueWatchMixin:
    """The queue watches and read bookkeeping of :class:`etcd_broker.transport.channel.Transport`.

    Needs ``watch_hub``, ``etcd``, ``keys``, ``config``, ``lease`` and ``wake()`` from the class it is mixed into.
    """

    def _init_queue_watch(self) -> None:
        self._queue_watches: dict[str, list] = {}  # queue -> [feed, consumers]
        self._hints: dict[str, list | None] = {}
        self._read_revision: dict[str, int] = {}
        self._forgotten_at = monotonic()
        self._event_revision: dict[str, int] = {}
        self._reads_generation = 0  # bumped by forget_reads: hints taken before it prove nothing
        self._cursors: dict[str, bytes] = {}  # queue -> the lowest ready key that may be live
        self._cursor_reads: dict[str, dict[int, bytes | None]] = {}  # queue -> read -> lowest put seen during it
        self._read_ids = itertools.count()
        self._watch_lock = threading.Lock()

    def _unwatch_all(self) -> None:
        """Drop every queue watch (the connection is closing)."""
        with self._watch_lock:
            queues, self._queue_watches = list(self._queue_watches), {}
        for queue in queues:
            self._leave_feed(queue)

    def watch_queue(self, queue: str) -> None:
        """Wake :meth:`drain_events` whenever a message is put on ``queue`` that we may claim."""
        with self._watch_lock:
            entry = self._queue_watches.get(queue)
            if entry is not None:
                entry[1] += 1
                return
            # one watch per process and lease (offers.QueueFeed), deletes too: a claim's delete settles an offer
            feed = offers.feeds().join(self._feed_key(queue), queue, self, lambda feed: self.watch_hub.subscribe(
                self.keys.ready(queue), feed.on_events, prefix=True, on_created=feed.on_created))
            self._queue_watches[queue] = [feed, 1]
        self.watch_hub.wait_created(feed.watch, timeout=self.config.timeout)
        self.forget_reads()  # the feed's watch may have been created before we joined it

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
            self._cursors.pop(queue, None)
        self._leave_feed(queue)
        return True

    def _leave_feed(self, queue: str) -> None:
        watch = offers.feeds().leave(self._feed_key(queue), self)
        if watch is not None:
            self.watch_hub.unsubscribe(watch)

    def _feed_key(self, queue: str) -> tuple[int, str]:
        """Transports share a consumer lease when they share the client (membership.consumer_lease)."""
        return id(self.etcd), self.keys.ready(queue)

    def offer_news(self, queue: str, rows: list) -> None:
        """Puts we may claim now (our feed's): hints, and the queue is not known empty."""
        with self._watch_lock:
            if queue not in self._queue_watches:  # unwatched meanwhile
                return
            self._event_revision[queue] = max(self._event_revision.get(queue, 0), max(row[2] for row in rows))
            self._lower_cursor(queue, min(row[0] for row in rows))
            hints = self._hints.get(queue)
            if hints is not None and len(hints) + len(rows) <= CLAIM_BATCH:
                hints.extend(rows)
            else:
                self._hints[queue] = None
                self._read_revision.pop(queue, None)  # a put held back may be older than our last read
        self.wake()

    def _lower_cursor(self, queue: str, key: bytes) -> None:
        """A put at ``key``: the head may be there now (and for every read under way). Under the lock."""
        cursor = self._cursors.get(queue)
        if cursor is not None and key < cursor:
            self._cursors[queue] = key
        reads = self._cursor_reads.get(queue)
        for read, low in list(reads.items()) if reads else ():
            if low is None or key < low:
                reads[read] = key

    def head_read_start(self, queue: str, from_cursor: bool = False) -> tuple[bytes | None, tuple | None]:
        """Where a head read of ``queue`` may start (None: the prefix), and a token for :meth:`head_read_end`.

        No token for a queue we do not watch: puts we would not see could land below any cursor;
        none either with ``from_cursor`` while the queue has no cursor (a read ahead is bounded by one).
        """
        with self._watch_lock:
            cursor = self._cursors.get(queue)
            if queue not in self._queue_watches or (from_cursor and cursor is None):
                return None, None
            read = next(self._read_ids)
            self._cursor_reads.setdefault(queue, {})[read] = None
            return cursor, (read, self._reads_generation, cursor)

    def head_read_end(self, queue: str, token: tuple | None, head: bytes | None) -> bool:
        """A head read with ``token`` found ``head`` first (None: nothing from where it started).

        The cursor moves there, or to a lower put seen meanwhile (its event may predate the
        read's revision yet come after it). Nothing is learned from a read that began before
        :meth:`forget_reads`. Returns False if the read may have missed the queue's head: it
        started at a cursor and a put below it was seen meanwhile (a restore or requeue goes back
        to its original, lower place), or reads were forgotten meanwhile; such a read must not
        make the queue known empty (:meth:`after_read`), or that put waits for the next forget.
        """
        if token is None:
            return True
        read, generation, start = token
        with self._watch_lock:
            reads = self._cursor_reads.get(queue, {})
            low = reads.pop(read, None)
            if not reads:
                self._cursor_reads.pop(queue, None)
            covered = start is None or (generation == self._reads_generation and (low is None or low >= start))
            if generation != self._reads_generation or queue not in self._queue_watches:
                return covered
            found = [key for key in (head, low) if key is not None]
            if head is None and queue in self._cursors:
                found.append(self._cursors[queue])  # nothing from the cursor on: it stays (or a put lowers it)
            if found:
                self._cursors[queue] = min(found)
            return covered

    def put_below(self, queue: str, key: bytes) -> None:
        """We put ``key`` back ourselves (a requeue): lower the cursor now, not when its watch event comes, so
        the channel's next get reads it first (a read ahead of the claim lies above it: channel.py ``_claim``)."""
        with self._watch_lock:
            self._lower_cursor(queue, key)

    def still_head(self, queue: str, key: bytes) -> bool:
        """True if no put below ``key`` was seen since a head read found it (the cursor is not under it).

        A read ahead (channel.py ``_claim``) is claimed later without reading again only while this holds;
        False too once reads were forgotten (no cursor) or the queue is no longer watched.
        """
        with self._watch_lock:
            cursor = self._cursors.get(queue)
            return cursor is not None and cursor >= key

    def drop_hints(self, queue: str, keys: list[bytes]) -> None:
        """These keys were deleted (claimed, by anyone): no hint of ours need try them."""
        with self._watch_lock:
            hints = self._hints.get(queue)
            if hints:
                gone = set(keys)
                self._hints[queue] = [row for row in hints if row[0] not in gone]

    def skip_held(self, queue: str, rows: list) -> list:
        """``rows`` of a range read without the puts our feed holds back (offered elsewhere, in their grace)."""
        entry = self._queue_watches.get(queue)
        return [row for row in rows if not entry[0].is_held(row[0], self)] if entry else rows

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
            self._cursors.clear()
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

