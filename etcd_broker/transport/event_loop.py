"""How the transport delivers: kombu's event loop (a Celery worker's hub) or ``drain_events``.

A wake-up pipe that the watch thread, acks and prefetch changes write to joins the worker's hub
(as kombu's redis.py does with its sockets); plain kombu consumers wait on a watch-fed event.

The safety re-check (every SAFETY_RECHECK_SECONDS) costs one read whatever the number of queues:
it reads etcd's current revision (a count-only read of one key) and asks the watch hub's stream
for a progress answer (a message on the stream, no request). If the answer comes within
PROGRESS_WAIT_SECONDS at or past that revision, every put up to the check reached our queue
watches and the delayed mover's (delayed.py) and nothing is re-read; if not (a stuck or broken
stream), every consumed queue is read again (``forget_reads``), as before, the mover reads every
followed queue's earliest due time again, and the lease sweeps every queue for a dead consumer's
messages (its consumer watch is on the same stream). A reconnect or a compacted watch forgets
reads at once (offers.QueueFeed.on_created), so the re-check only has to catch a stream that
stopped delivering.
"""
from __future__ import annotations

import logging
import os
import threading
from queue import Empty
from time import monotonic

from etcd_broker.core import ops
from etcd_broker.core.client import CONNECTION_ERRORS, EtcdUnreachable

logger = logging.getLogger(__name__)

#: An idle consumer re-checks its queues this often even without a watch event (safety net only).
SAFETY_RECHECK_SECONDS = 30.0
#: How long the watch stream may take to answer a re-check's progress request (else reads are forgotten).
PROGRESS_WAIT_SECONDS = 5.0
#: Most messages delivered per event-loop wake-up before the hub serves its other fds again.
DELIVERIES_PER_WAKE = 64


class EventLoopMixin:
    """Wake-up pipe, hub registration and ``drain_events`` of :class:`etcd_broker.transport.channel.Transport`.

    Needs ``cycle``, ``lease``, ``config``, ``etcd``, ``keys``, ``watch_hub``, ``delayed``, ``forget_reads()``,
    ``on_message_ready()``, ``give_back_handoffs_without_room()`` and the queue watches (queue_watch.py)
    from the class it is mixed into.
    """

    def _init_event_loop(self) -> None:
        self._wakeup = threading.Event()  # drain_events waits on this (no event loop)
        self._wakeup.set()
        self._pipe: tuple[int, int] | None = None  # (read, write): the event loop's wake-up fd
        self._wake_pending = threading.Event()  # a byte is in the pipe; no need to write another
        self._loop = None
        self._recheck_timer = None  # the hub's safety-net timer entry
        self._rechecked_at = monotonic()  # when the last safety re-check started
        self._recheck_pending: tuple[int, float] | None = None  # (revision, verify at) of a re-check in flight

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
        self._recheck_timer = loop.call_repeatedly(SAFETY_RECHECK_SECONDS, self._recheck_in_loop)
        self._wake_pending.clear()
        self.wake()  # claim what waited before we joined

    def _recheck_in_loop(self) -> None:
        """The hub's timer: start a re-check, verify it PROGRESS_WAIT_SECONDS later (never blocks the hub)."""
        self.safety_recheck()
        loop = self._loop
        if self._recheck_pending is not None and loop is not None:
            loop.call_later(PROGRESS_WAIT_SECONDS, self.verify_recheck)

    def safety_recheck(self) -> None:
        """Start a safety re-check: one count-only read for etcd's revision, one progress request.

        :meth:`verify_recheck` decides; without an answer to compare (etcd or the stream unreachable)
        every consumed queue is read again at once.
        """
        self._rechecked_at = monotonic()
        self._recheck_pending = None
        lease_id = self.lease.lease_id
        try:
            revision = ops.get(self.etcd, self.keys.consumer(lease_id or 0), count_only=True).header.revision
        except CONNECTION_ERRORS as exc:
            logger.debug("safety re-check: etcd unreachable (%s); reading every queue", type(exc).__name__)
            self._recheck_failed()
            return
        if not self.watch_hub.request_progress():
            self._recheck_failed()
            return
        self._recheck_pending = (revision, monotonic() + PROGRESS_WAIT_SECONDS)

    def verify_recheck(self) -> bool:
        """True if the watch stream answered at or past the re-check's revision (no put missed);
        else every consumed queue is read again. No re-check in flight: True."""
        pending, self._recheck_pending = self._recheck_pending, None
        if pending is None:
            return True
        if self.watch_hub.progress_revision >= pending[0]:
            return True
        logger.info("safety re-check: the watch stream did not answer up to revision %d; reading every queue",
                    pending[0])
        self._recheck_failed()
        return False

    def _recheck_failed(self) -> None:
        """The stream may have missed events: read every consumed queue, and every followed queue's
        earliest due time (delayed.py), again, and sweep every queue for a dead consumer's messages
        (membership.py: its consumer watch is on the same stream too)."""
        self.forget_reads()
        self.delayed.look_again_all()
        self.lease.sweep_everything()

    def _recheck_due_in(self) -> float:
        """``drain_events``: run what of the re-check is due; seconds until its next step."""
        now = monotonic()
        pending = self._recheck_pending
        if pending is not None:
            if self.watch_hub.progress_revision >= pending[0] or now >= pending[1]:
                self.verify_recheck()
            else:
                return pending[1] - now
        if now - self._rechecked_at >= SAFETY_RECHECK_SECONDS:
            self.safety_recheck()
            return PROGRESS_WAIT_SECONDS
        return self._rechecked_at + SAFETY_RECHECK_SECONDS - now

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
            recheck_in = self._recheck_due_in()
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
            remaining = recheck_in if deadline is None else deadline - monotonic()
            if remaining <= 0:
                raise TimeoutError()
            self._wakeup.wait(max(min(remaining, recheck_in), 0.0))

    def _close_pipe(self) -> None:
        pipe, self._pipe = self._pipe, None
        if pipe is None:
            return
        if self._loop is not None:
            self.unregister_from_event_loop(None, self._loop)
        for fd in pipe:
            os.close(fd)

