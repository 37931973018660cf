"""kombu's ``Producer.batch()`` on etcd: buffered publishes written as a few transactions.

One etcd transaction of up to ``MAX_TXN_OPS`` puts is one Raft entry and one disk sync,
so a single producer thread sends a backlog many times faster than one put per message.
A flush is atomic: every message of one transaction is written, or none. A transaction whose
call fails without an answer (connection lost, deadline, leader change) is sent again, up to
WRITE_ATTEMPTS times, with the same keys: it also writes the publish marker of its first message
(channel.py) and compares it to absent, so a transaction that had been committed is not
stored twice. As with kombu's Redis batch, a flush that still fails raises
``BatchPublishError`` and the batch cannot be used again; an exception inside the ``with``
block discards what was not flushed yet.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from kombu.exceptions import BatchPublishError

from etcd_broker.core import ops
from etcd_broker.core.client import CONNECTION_ERRORS
from etcd_broker.transport.channel import Guard, marker_lease, note_retry

logger = logging.getLogger(__name__)

MAX_TXN_OPS, MAX_TXN_BYTES = ops.MAX_TXN_OPS, ops.MAX_TXN_BYTES  # etcd's limits, one place (ops.py)
#: Sends of one transaction whose calls fail without an answer (the marker makes a resend safe).
WRITE_ATTEMPTS = 3
#: Seconds between two sends of one transaction (the client fails over to another member meanwhile).
WRITE_RETRY_SECONDS = 0.25


class PublishBatch:
    """Puts collected by :meth:`Channel._put` while a ``Producer.batch()`` is active."""

    def __init__(self, channel: Any, max_size: int) -> None:
        self.channel = channel
        self.max_size = max_size
        self._pending: list[tuple[str, bytes, str | None]] = []  # key, value, publish marker
        self._bytes = 0
        self._failed: BaseException | None = None
        self._aborted = False
        self._closed = False

    def publish(self, message: dict, **kwargs: Any) -> Any:
        """Route one prepared message; its plain puts are buffered, anything else is written now."""
        self._check_usable()
        return self.channel.basic_publish(message, _publish_batch=self, **kwargs)

    def add(self, key: str, value: bytes, marker: str | None = None) -> None:
        """Buffer one put (called by ``Channel._put``; ``marker``: its publish marker key, channel.py);
        flush when a transaction would be full (one op is kept for the marker)."""
        self._check_usable()
        if self._pending and (len(self._pending) >= MAX_TXN_OPS - 1
                              or self._bytes + len(key) + len(value) > MAX_TXN_BYTES):
            self._write()
        self._pending.append((key, value, marker))
        self._bytes += len(key) + len(value)
        if len(self._pending) >= self.max_size:
            self.flush()

    def flush(self) -> None:
        """Write everything buffered (before a publish that cannot be batched, and at the end)."""
        self._check_usable()
        while self._pending:
            self._write()

    def _write(self) -> None:
        batch = self._pending[:MAX_TXN_OPS - 1]
        try:
            self._send(batch)
        except Exception as exc:
            self._failed = exc
            self._pending, self._bytes = [], 0
            raise BatchPublishError(f"etcd publish batch of {len(batch)} message(s) failed; delivery is "
                                    f"uncertain: {exc}") from exc
        del self._pending[:len(batch)]
        self._bytes = sum(len(key) + len(value) for key, value, _ in self._pending)

    def _send(self, batch: list[tuple[str, bytes, str | None]]) -> None:
        """One transaction; sent again after a failure without an answer (guarded by the first marker)."""
        client = self.channel.client
        compare, success = [], [ops.put(key, value) for key, value, _ in batch]
        marker = batch[0][2]
        if marker is not None:
            guard = Guard(marker, marker_lease(client))
            compare, success = [guard.compare()], [*success, guard.put()]
        for attempt in range(1, WRITE_ATTEMPTS + 1):
            try:
                if not ops.txn(client, compare, success).succeeded:
                    note_retry(self.channel.keys.queue_of(batch[0][0]), marker)
                return
            except CONNECTION_ERRORS as exc:
                if marker is None or attempt == WRITE_ATTEMPTS:
                    raise
                logger.warning("etcd publish batch of %d message(s): %s; sending it again (attempt %d of %d)",
                               len(batch), exc or type(exc).__name__, attempt + 1, WRITE_ATTEMPTS)
                time.sleep(WRITE_RETRY_SECONDS)

    def discard(self) -> None:
        """Drop what was not written yet (an exception inside the ``with`` block)."""
        self._aborted = True
        self._pending, self._bytes = [], 0

    def close(self) -> None:
        self._closed = True

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("etcd publish batch is closed")
        if self._aborted:
            raise RuntimeError("etcd publish batch is aborted")
        if self._failed is not None:
            raise BatchPublishError("etcd publish batch cannot be reused after a failure") from self._failed
