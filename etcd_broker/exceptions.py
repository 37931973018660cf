"""Every exception the library raises for its users to catch, defined here (the raisers import them).

* :class:`EtcdConfigError`: a URL or option that cannot describe an etcd connection, or a transport
  option of a wrong type or value (transport/options.py).
* :class:`EtcdUnreachable`: no etcd member answered (a kombu/Celery connection error).
* :class:`EtcdNoSpace`: etcd's backend quota is full; writes fail until an operator frees space.
* :class:`MessageTooLarge`: a message over ``max_message_bytes``, refused before anything is written.
* :class:`QueueArgumentError`: a queue name or argument the transport refuses.
* :class:`QueueFull`: publish refused by a queue's ``x-max-length`` with ``reject-publish``.
* :class:`WriteConflict`: a task's result (or a chord's size) kept changing under our compare-and-put.

Only kombu and python3-etcd3 are imported (their base classes), so kombu-only users import no Celery.
"""
from __future__ import annotations

from etcd3 import exceptions as etcd_exceptions
from kombu.exceptions import KombuError, LimitExceeded

__all__ = ["EtcdConfigError", "EtcdNoSpace", "EtcdUnreachable", "MessageTooLarge", "QueueArgumentError",
           "QueueFull", "WriteConflict"]


class EtcdConfigError(ValueError):
    """A URL or option that cannot describe an etcd connection, or a transport option of a wrong type or value."""


class EtcdUnreachable(etcd_exceptions.ConnectionFailedError):
    """A connection error that says where and why, in gRPC's words (refused, TLS handshake failed...)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else super().__str__()


class EtcdNoSpace(RuntimeError):
    """etcd's backend quota is full (NOSPACE alarm): every write is refused until an operator
    frees space (compact, defragment, disarm the alarm: docs/reliability.md). Not retried."""


class MessageTooLarge(ValueError):
    """A message bigger than etcd accepts; refused before anything is written."""


class QueueArgumentError(KombuError, ValueError):
    """A queue name or argument this transport refuses; nothing was written."""


class QueueFull(LimitExceeded):
    """Publish refused: the queue holds ``x-max-length`` messages and its overflow is reject-publish."""


class WriteConflict(RuntimeError):
    """A key kept changing under a compare-and-put (a task's result, a chord's size)."""
