"""What the transport knows about its queues between reads: watches, hints and known-empty queues.

One watch per consumed queue (on the process's watch hub) wakes the transport on every put.
After a read that saw a whole queue, the puts seen since are kept as hints (claimable without a
range read) and the queue is known empty until a put arrives; a reconnect forgets it all.
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

    def unwatch_queue(self, queue: str) -> None:
        with self._watch_lock:
            entry = self._queue_watches.get(queue)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                del self._queue_watches[queue]
                self.watch_hub.unsubscribe(entry[0])

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
        """After a range read at ``revision``: if it saw the whole queue, new messages come by watch."""
        with self._watch_lock:
            self._hints[queue] = [] if drained else None
            if drained:
                self._read_revision[queue] = revision
            else:
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
            self._forgotten_at = monotonic()
        self.wake()

    def take_hints(self, queue: str) -> list | None:
        """Messages seen arriving on a queue known to be empty: claimable without a range read."""
        with self._watch_lock:
            hints = self._hints.get(queue)
            if not hints:
                return None
            self._hints[queue] = []
        return sorted(hints)

