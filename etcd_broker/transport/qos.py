"""The transport's QoS: an ack deletes the claimed key, a requeue puts it back in its place.

kombu's prefetch accounting, less the messages kept across a connection reset (executing.py),
and a wake-up of the transport whenever a slot frees.
"""
from __future__ import annotations

import logging

from kombu.transport import virtual

from etcd_broker.transport import executing

logger = logging.getLogger(__name__)


class QoS(virtual.QoS):
    """Acks delete the claimed key; requeue moves it back to its place in line.

    Only kombu's public QoS API is used (``get``, ``ack``, ``reject``); a requeue
    goes through :meth:`Channel._restore`, the hook kombu's ``restore_unacked`` calls.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._held: dict = {}  # delivery tag -> unacked key, from delivery until ack, reject or give-back

    def append(self, message, delivery_tag):
        super().append(message, delivery_tag)
        key = message.delivery_info.get("etcd_key")
        if key:
            self._held[delivery_tag] = key

    def held_keys(self) -> list[str]:
        """Unacked keys of the messages delivered through this QoS and not settled (reconcile.py)."""
        return list(self._held.values())

    def ack(self, delivery_tag):
        self._forget(delivery_tag)
        super().ack(delivery_tag)
        self._held.pop(delivery_tag, None)  # after _forget queued its delete: held all the way
        self._wake()

    def restore_unacked(self):
        """At close: each message goes back or stays with its running task (Channel._restore)."""
        try:
            return super().restore_unacked()
        finally:
            self._held.clear()

    def can_consume(self):
        room = self.can_consume_max_estimate()
        return room is None or room > 0

    def can_consume_max_estimate(self):
        """kombu's room under the prefetch limit, less the messages kept across a reset (executing.py)."""
        room = super().can_consume_max_estimate()
        return None if room is None else max(room - executing.kept(), 0)

    def reject(self, delivery_tag, requeue=False):
        running = executing.take(self.channel, delivery_tag)
        if running is not None:  # kept across a reset (executing.py): its channel's QoS forgot it
            if requeue:
                self.channel._requeue_or_later(running)
            else:
                self.channel._forget(running)
            return
        if not requeue:
            self._forget(delivery_tag)
        super().reject(delivery_tag, requeue=requeue)  # requeue=True -> Channel._restore
        self._held.pop(delivery_tag, None)
        self._wake()

    def _forget(self, delivery_tag) -> None:
        try:
            message = self.get(delivery_tag)
        except KeyError:  # acked twice, given back by a reset, or still running across one
            message = executing.take(self.channel, delivery_tag)
            if message is None:
                return
        self.channel._forget(message)

    def _wake(self) -> None:
        """A slot may have freed: let the event loop (or drain_events) claim again."""
        connection = self.channel.connection
        if connection is not None:  # None once the channel is closed (a reset requeued what it held)
            connection.wake()
