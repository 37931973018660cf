"""What the transport knows about its queues between reads: watches, hints and known-empty queues.

One watch per consumed queue (on the process's watch hub) wakes the transport on every put.
After a read that saw a whole queue, the puts seen since are kept as hints (claimable without a
range read) and the queue is known empty until a put arrives. Once every hint taken has been
claimed (by us or by others), the queue is known empty again as of the last put seen, so a lone
message costs its claim and no range read. A reconnect forgets it all.
"""
from __future__ import annotations

import logging
import threading
from functools import partial
from time import monotonic

logger = logging.getLogger(__name__)

#: Most messages claimed in one transaction (2 ops each; etcd allows 128 ops per txn); also the
#: most put events kept as hints for a queue known empty.
CLAIM_BATCH = 32


class QueueWatchMixin:
    """The queue watches and read bookkeeping of :class:`etcd_broker.transport.Transport`.

    Needs ``watch_hub``, ``keys``, ``config`` and ``wake()`` from the class it is mixed into.
    """

    def _init_queue_watch(self) -> None:
        self._queue_watches: dict[str, list] = {}  # queue -> [watch, consumers]
        self._hints: dict[str, list | None] = {}
        self._read_revision: dict[str, int] = {}
        self._forgotten_at = monotonic()
        self._event_revision: dict[str, int] = {}
        self._reads_generation = 0  # bumped by forget_reads: hints taken before it prove nothing
        self._watch_lock = threading.Lock()

    def _unwatch_all(self) -> None:
        """Drop every queue watch (the connection is closing)."""
        with self._watch_lock:
            watches, self._queue_watches = [entry[0] for entry in self._queue_watches.values()], {}
        for watch in watches:
            self.watch_hub.unsubscribe(watch)

    def watch_queue(self, queue: str) -> None:
        """Wake :meth:`drain_events` whenever a message is put on ``queue``."""
        with self._watch_lock:
            entry = self._queue_watches.get(queue)
            if entry is not None:
                entry[1] += 1
                return
            watch = self.watch_hub.subscribe(self.keys.ready(queue), partial(self._on_ready, queue), prefix=True,
                                             puts_only=True, on_created=self.forget_reads)
            self._queue_watches[queue] = [watch, 1]
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
        self.watch_hub.unsubscribe(entry[0])
        return True

    def _on_ready(self, queue: str, events) -> None:
        with self._watch_lock:
            self._event_revision[queue] = events[-1].kv.mod_revision
            hints = self._hints.get(queue)
            if hints is not None:
                if len(hints) + len(events) <= CLAIM_BATCH:
                    hints.extend((e.kv.key, e.kv.value, e.kv.mod_revision) for e in events)
                else:
                    self._hints[queue] = None
        self.wake()

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

