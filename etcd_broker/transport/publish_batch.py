"""kombu's ``Producer.batch()`` on etcd: buffered publishes written as a few transactions.

One etcd transaction of up to ``MAX_TXN_OPS`` puts is one Raft entry and one disk sync,
so a single producer thread sends a backlog many times faster than one put per message.
A flush is atomic: every message of one transaction is written, or none. As with kombu's
Redis batch, a flush that fails raises ``BatchPublishError`` (delivery uncertain when the
connection broke mid-call) and the batch cannot be used again; an exception inside the
``with`` block discards what was not flushed yet.
"""
from __future__ import annotations

import logging
from typing import Any

from kombu.exceptions import BatchPublishError

from etcd_broker.core import ops

logger = logging.getLogger(__name__)

MAX_TXN_OPS, MAX_TXN_BYTES = ops.MAX_TXN_OPS, ops.MAX_TXN_BYTES  # etcd's limits, one place (ops.py)


class PublishBatch:
    """Puts collected by :meth:`Channel._put` while a ``Producer.batch()`` is active."""

    def __init__(self, channel: Any, max_size: int) -> None:
        self.channel = channel
        self.max_size = max_size
        self._pending: list[tuple[str, bytes]] = []
        self._bytes = 0
        self._failed: BaseException | None = None
        self._aborted = False
        self._closed = False

    def publish(self, message: dict, **kwargs: Any) -> Any:
        """Route one prepared message; its plain puts are buffered, anything else is written now."""
        self._check_usable()
        return self.channel.basic_publish(message, _publish_batch=self, **kwargs)

    def add(self, key: str, value: bytes) -> None:
        """Buffer one put (called by ``Channel._put``); flush when a transaction would be full."""
        self._check_usable()
        if self._pending and (len(self._pending) >= MAX_TXN_OPS or self._bytes + len(key) + len(value) > MAX_TXN_BYTES):
            self._write()
        self._pending.append((key, value))
        self._bytes += len(key) + len(value)
        if len(self._pending) >= self.max_size:
            self.flush()

    def flush(self) -> None:
        """Write everything buffered (before a publish that cannot be batched, and at the end)."""
        self._check_usable()
        while self._pending:
            self._write()

    def _write(self) -> None:
        batch = self._pending[:MAX_TXN_OPS]
        try:
            ops.txn(self.channel.client, success=[ops.put(key, value) for key, value in batch])
        except Exception as exc:
            self._failed = exc
            self._pending, self._bytes = [], 0
            raise BatchPublishError(f"etcd publish batch of {len(batch)} message(s) failed; delivery is "
                                    f"uncertain: {exc}") from exc
        del self._pending[:len(batch)]
        self._bytes = sum(len(key) + len(value) for key, value in self._pending)

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
