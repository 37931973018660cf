"""Every exception the library raises for its users to catch, importable from one place.

Each is defined beside the code that raises it; this module names them together:

* :class:`EtcdConfigError`: a URL or option that cannot describe an etcd connection.
* :class:`EtcdUnreachable`: no etcd member answered (a kombu/Celery connection error).
* :class:`EtcdNoSpace`: etcd's backend quota is full; writes fail until an operator frees space.
* :class:`MessageTooLarge`: a message over ``max_message_bytes``, refused before anything is written.
* :class:`QueueArgumentError`: a queue name or argument the transport refuses.
* :class:`QueueFull`: publish refused by a queue's ``x-max-length`` with ``reject-publish``.
"""
from __future__ import annotations

from etcd_broker.core.client import EtcdConfigError, EtcdNoSpace, EtcdUnreachable
from etcd_broker.transport.channel import MessageTooLarge
from etcd_broker.transport.queue_limits import QueueArgumentError, QueueFull

__all__ = ["EtcdConfigError", "EtcdNoSpace", "EtcdUnreachable", "MessageTooLarge", "QueueArgumentError", "QueueFull"]
