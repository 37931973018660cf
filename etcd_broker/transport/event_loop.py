"""How the transport delivers: kombu's event loop (a Celery worker's hub) or ``drain_events``.

A wake-up pipe that the watch thread, acks and prefetch changes write to joins the worker's hub
(as kombu's redis.py does with its sockets); plain kombu consumers wait on a watch-fed event.
"""
from __future__ import annotations

import logging
import os
import threading
from queue import Empty
from time import monotonic

from etcd_broker.core.client import EtcdUnreachable

logger = logging.getLogger(__name__)

#: An idle consumer re-checks its queues this often even without a watch event (safety net only).
SAFETY_RECHECK_SECONDS = 30.0
#: Most messages delivered per event-loop wake-up before the hub serves its other fds again.
DELIVERIES_PER_WAKE = 64


class EventLoopMixin:
    """Wake-up pipe, hub registration and ``drain_events`` of :class:`etcd_broker.transport.channel.Transport`.

    Needs ``cycle``, ``lease``, ``config``, ``forget_reads()``, ``on_message_ready()``,
    ``give_back_handoffs_without_room()`` and the queue watches (queue_watch.py) from the class it
    is mixed into.
    """

    def _init_event_loop(self) -> None:
        self._wakeup = threading.Event()  # drain_events waits on this (no event loop)
        self._wakeup.set()
        self._pipe: tuple[int, int] | None = None  # (read, write): the event loop's wake-up fd
        self._wake_pending = threading.Event()  # a byte is in the pipe; no need to write another
        self._loop = None
        self._recheck_timer = None  # the hub's safety-net timer entry

    def wake(self) -> None:
        """Something may be claimable (a put seen by the watch, an ack, more prefetch room)."""
        self._wakeup.set()
        pipe = self._pipe
        if pipe is not None and not self._wake_pending.is_set():
            self._wake_pending.set()
            try:
                os.write(pipe[1], b"!")
            except (BlockingIOError, OSError):  # full (a wake is pending anyway) or closed
                pass

    def register_with_event_loop(self, connection, loop):
        """Join the worker's hub: the watch thread, acks and timers wake it through a pipe."""
        if self._pipe is None:
            self._pipe = os.pipe()
            for fd in self._pipe:
                os.set_blocking(fd, False)
        self._loop = loop
        loop.add_reader(self._pipe[0], self.on_readable, self._pipe[0])
        if self._recheck_timer is not None:
            self._recheck_timer.cancel()
        self._recheck_timer = loop.call_repeatedly(SAFETY_RECHECK_SECONDS, self.forget_reads)
        self._wake_pending.clear()
        self.wake()  # claim what waited before we joined

    @property
    def in_event_loop(self) -> bool:
        """True while a hub (a Celery worker's event loop) delivers for us."""
        return self._loop is not None

    def unregister_from_event_loop(self, connection, loop):
        if self._pipe is not None:
            loop.remove_reader(self._pipe[0])
        if self._recheck_timer is not None:
            self._recheck_timer.cancel()
            self._recheck_timer = None
        self._loop = None

    def on_readable(self, fileno):
        """The hub saw a wake-up: deliver what our channels have room for, then return to the hub."""
        try:
            while os.read(fileno, 4096):
                pass
        except BlockingIOError:
            pass
        self._wake_pending.clear()  # after draining: a wake from now on writes a new byte
        for _ in range(DELIVERIES_PER_WAKE):
            try:
                self.cycle.get(self.dispatch)
            except Empty:
                self.give_back_handoffs_without_room()
                return
        self.wake()  # more may be waiting: come back after the hub has served its other fds

    def dispatch(self, message: dict, queue: str) -> None:
        """Hand a claimed message to the queue's consumer; without one, give it back to the queue."""
        if queue not in self._queue_watches:  # its consumer was cancelled after the claim
            key = message["properties"]["delivery_info"].get("etcd_key")
            logger.info("no consumer for queue %r any more; message %s requeued", queue, key)
            if key:
                self.lease.requeue_later(key)
            return
        self.on_message_ready(None, message, queue)

    def drain_events(self, connection, timeout=None):
        """Deliver one message; wait on the watch-fed event, never a sleep loop.

        While our lease keepalive fails, a wait that ends empty raises :class:`EtcdUnreachable`
        (a connection error), so kombu's ``ConsumerMixin`` reconnects as it does for other brokers.
        """
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            if monotonic() - self._forgotten_at > SAFETY_RECHECK_SECONDS:
                self.forget_reads()
            if self._wakeup.is_set():
                self._wakeup.clear()
                try:
                    result = self.cycle.get(self.dispatch, timeout=timeout)
                except Empty:
                    pass
                else:
                    self._wakeup.set()  # more may be waiting: look again before sleeping
                    return result
            if self.lease.failing():
                raise EtcdUnreachable(f"etcd at {self.config.describe()} does not answer the consumer lease "
                                      "keepalive")
            remaining = SAFETY_RECHECK_SECONDS if deadline is None else deadline - monotonic()
            if remaining <= 0:
                raise TimeoutError()
            self._wakeup.wait(min(remaining, SAFETY_RECHECK_SECONDS))

    def _close_pipe(self) -> None:
        pipe, self._pipe = self._pipe, None
        if pipe is None:
            return
        if self._loop is not None:
            self.unregister_from_event_loop(None, self._loop)
        for fd in pipe:
            os.close(fd)

