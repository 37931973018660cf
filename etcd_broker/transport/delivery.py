"""How a claimed message reaches a waiting consumer: hand-off, the worker's event loop, queue hints.

A consumer with room waits without reading: it parks on its queues (hand-off: a publish to a
parked consumer is its claim too), a watch per queue tells it what arrived, and a wake-up pipe
brings that into a Celery worker's hub (or ``drain_events`` for plain kombu). Sections:

- *handoff*: :class:`Parking` (a consumer's parked keys, the hand-offs it received) and
  :class:`ParkedConsumers` (the publisher's side: which parked consumer gets the put).
- *event_loop*: :class:`EventLoopMixin`: ``register_with_event_loop``, ``on_readable``, ``drain_events``.
- *queue_watch*: :class:`QueueWatchMixin`: the watch's hints and "known empty" queues.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from queue import Empty
from time import monotonic
from typing import Any

from etcd_broker.core import ops
from etcd_broker.core.client import CONNECTION_ERRORS, EtcdUnreachable, PerProcess
from etcd_broker.core.ops import KeySpace
from etcd_broker.core.watch import EVENT_PUT, Watch, WatchHub
from etcd_broker.transport import offers

# -------------------- handoff: Hand-off: a publish that goes straight to an idle consumer, its claim in the
#   same transaction.
#
# Every etcd write is a Raft proposal and a disk sync. A message for an idle worker used to cost
# two on its way: the publish, then the consumer's claim. Here an idle consumer *parks* on the
# queue: it writes ``<queue>/parked/<token>`` (empty value, attached to its lease) once it knows
# the queue is empty and it has prefetch room. A publisher that knows a parked consumer (it follows
# the queue's parked keys through the watch hub) writes the message in one transaction that
#
# * if the parked key is unchanged since it was parked (its mod_revision): puts the message under
#   the consumer's ``unacked/<lease>/`` (claimed, exactly as a claim transaction leaves it) and
#   overwrites the parked key with a hand-off record (the unacked key and the message);
# * else: puts the message under ``ready/``, as any publish does.
#
# So the publish returns once the message is durable, as before, and the consumer learns of it
# from the watch event on its parked key (which carries the message): no claim transaction, no
# read. Guarantees are those of a claim: the message lives without a lease under the consumer's
# ``unacked/<lease>/``, so if the consumer dies its lease lapses and the sweeper puts the message
# back in line; one parked key takes one message (the compare); a consumer parks only with room
# under its prefetch limit (a hand-off that finds the room taken meanwhile waits, claimed, until a
# slot frees, as a prefetched message does). A hand-off still waiting when the consumer's lease
# lapses (a partition longer than the TTL) is delivered afterwards only if etcd says it is still the
# consumer's: the sweeper may have put it back in line for another worker. A consumer that stops
# consuming a queue withdraws its park: the key is deleted if it is unchanged, and a hand-off it
# never took is put back in line.
#
# Only consumers inside an event loop (a Celery worker) park, and only publishes without TTL,
# queue limits or ``Producer.batch()``, of at most HANDOFF_MAX_BYTES, are handed off.

logger = logging.getLogger(__name__)

#: Largest message handed off (the transaction carries it twice: message and hand-off record).
HANDOFF_MAX_BYTES = 65_536
#: A parked key's value while its consumer waits; a hand-off record replaces it.
IDLE = b""
#: Most queues one process follows the parked consumers of (each costs a watch).
MAX_FOLLOWED_QUEUES = 64


def record(unacked_key: str, value: bytes) -> bytes:
    """The hand-off record a publisher writes over a parked key: the claimed key, then the message."""
    return unacked_key.encode() + b"\n" + value


def parse_record(value: bytes) -> tuple[str, bytes]:
    key, _, message = value.partition(b"\n")
    return key.decode(), message


def handoff_ops(keys: KeySpace, queue: str, position: str, value: bytes, ready_key: str,
                park: tuple[str, int, int]) -> tuple[list, list, list]:
    """The publish transaction for a parked consumer: (compare, success, failure)."""
    key, revision, lease = park
    unacked = keys.unacked_message(queue, lease, position)
    return ([ops.compare(key, "mod_revision", revision)],
            [ops.put(unacked, value), ops.put(key, record(unacked, value), lease)],
            [ops.put(ready_key, value)])


# -- publisher side: which consumers are parked ------------------------------------------
class ParkedConsumers:
    """What one process knows of the consumers parked on the queues it publishes to.

    A queue is followed from its first publish (a watch on its parked keys, read once each time
    the watch is created); until then, and whenever no consumer is parked, publishes go to ready.
    A stale entry costs nothing but the fallback: the transaction's compare fails and the
    message is put in ready by the same transaction.
    """

    def __init__(self, client: Any, keys: KeySpace, hub: WatchHub) -> None:
        self.client, self.keys, self.hub = client, keys, hub
        self._lock = threading.Lock()
        self._idle: dict[str, dict[bytes, tuple[int, int]]] = {}  # queue -> parked key -> (revision, lease)
        self._seen: dict[bytes, int] = {}  # parked key -> newest revision known (stale news is ignored)
        self._watches: dict[str, Watch] = {}

    def pick(self, queue: str) -> tuple[str, int, int] | None:
        """A parked consumer of ``queue`` (key, revision, lease), taken from the view: this process
        never hands two messages to one park."""
        with self._lock:
            idle = self._idle.get(queue)
            if idle is None:
                if queue not in self._watches and len(self._watches) < MAX_FOLLOWED_QUEUES:
                    self._follow(queue)
                return None
            if not idle:
                return None
            key, (revision, lease) = idle.popitem()
        return key.decode(), revision, lease

    def waiting(self, queue: str) -> int:
        """How many consumers this process knows to be parked on ``queue`` (for operators and tests)."""
        with self._lock:
            return len(self._idle.get(queue) or ())

    def _follow(self, queue: str) -> None:
        prefix = self.keys.parked(queue)
        self._watches[queue] = self.hub.subscribe(
            prefix, lambda events: self._update(queue, ((e.kv, e.type == EVENT_PUT) for e in events)),
            prefix=True, on_created=lambda: self._read(queue), label="parked")

    def _read(self, queue: str) -> None:
        """Each time the watch is (re)created: the parked keys now (on the watch thread; one read)."""
        try:
            response = ops.get(self.client, self.keys.parked(queue), prefix=True)
        except Exception as exc:  # noqa: BLE001 - the view stays empty; publishes go to ready
            logger.debug("parked consumers of %r not read: %s", queue, exc)
            return
        with self._lock:
            self._idle.setdefault(queue, {})
        self._update(queue, ((kv, True) for kv in response.kvs))

    def _update(self, queue: str, changes: Iterable[tuple[Any, bool]]) -> None:
        with self._lock:
            idle = self._idle.setdefault(queue, {})
            for kv, present in changes:
                if kv.mod_revision and kv.mod_revision <= self._seen.get(kv.key, 0):
                    continue
                self._seen[kv.key] = kv.mod_revision
                if present and kv.value == IDLE and kv.lease:
                    idle[kv.key] = (kv.mod_revision, kv.lease)
                else:
                    idle.pop(kv.key, None)
                    if not present:
                        self._seen.pop(kv.key, None)

    def close(self) -> None:
        with self._lock:
            watches, self._watches, self._idle = list(self._watches.values()), {}, {}
        for watch in watches:
            self.hub.unsubscribe(watch)


_views = PerProcess()


def parked_consumers(client: Any, keys: KeySpace, hub: WatchHub) -> ParkedConsumers:
    """This process's view of the parked consumers for ``client`` and ``keys`` (shared by its connections)."""
    return _views.get((id(client), keys.root), lambda: ParkedConsumers(client, keys, hub),
                      usable=lambda view: view.client is client)


def waiting(queue: str, keys: KeySpace | None = None) -> int:
    """Parked consumers of ``queue`` known to this process's publishers (its views of ``keys``' key
    space, or all of them)."""
    return sum(view.waiting(queue) for view in _views.mine() if keys is None or view.keys.root == keys.root)


# -- consumer side: parking and taking hand-offs -----------------------------------------------
class _Park:
    """One consumed queue's parked key: the newest revision we know of it (``seen``), its
    mod_revision then (``mod``, 0: absent), whether it says we wait, and the hand-offs received
    and not yet delivered."""

    __slots__ = ("key", "watch", "seen", "mod", "parked", "handed", "lapsed")

    def __init__(self, key: str) -> None:
        self.key = key
        self.watch: Watch | None = None
        self.seen = 0
        self.mod = 0
        self.parked = False
        self.handed: deque[tuple[str, bytes]] = deque()
        #: unacked keys of hand-offs received before the park's lease lapsed: checked before delivery
        self.lapsed: set[str] = set()


class Parking:
    """A consuming transport's parks: one key per consumed queue, written while the queue is empty.

    ``wake()`` is called when a hand-off arrives; ``withdraw_later(key, seen)`` (the lease's
    sweeper) deletes a park and puts back a hand-off that was never taken.
    """

    def __init__(self, client: Any, keys: KeySpace, hub: Callable[[], WatchHub], wake: Callable[[], None],
                 timeout: float | None) -> None:
        self.client, self.keys = client, keys
        self._hub, self._wake, self._timeout = hub, wake, timeout
        self._token = uuid.uuid4().hex
        self._parks: dict[str, _Park] = {}
        self._lock = threading.Lock()

    def take(self, queue: str, current_key: Callable[[str], str] = str,
             in_doubt: bool = False) -> tuple[str, bytes] | None:
        """A message handed to us on ``queue`` (its unacked key and value), oldest first.

        A hand-off made under a lease that lapsed (we saw its park deleted, or ``current_key``,
        the lease's mapping of a key to our current lease, moves it) is delivered only if its key
        is still ours: under the lapsed lease, or where the lease's adoption moved it. Else a
        sweeper put it back in line and it may have run elsewhere already, so it is dropped. Every
        hand-off taken while our lease is ``in_doubt`` (no recent keepalive answer) gets the same check:
        after a cut, the hand-off's event can reach us before both the park's deletion and the
        keepalive's verdict (the chaos test ran such a task twice: on another worker, then here
        right after the heal).
        """
        park = self._parks.get(queue)
        while park is not None and park.handed:
            with self._lock:
                if not park.handed:
                    return None
                key, value = park.handed.popleft()
                lapsed = key in park.lapsed
                park.lapsed.discard(key)
            adopted = current_key(key)
            if not lapsed and adopted == key and not in_doubt:
                return key, value
            try:
                held = self._still_ours(key, adopted)
            except Exception:  # etcd unreachable: keep it for the next take, still to be checked
                with self._lock:
                    park.handed.appendleft((key, value))
                    park.lapsed.add(key)
                raise
            if held is not None:
                return held, value
            logger.warning("hand-off %s dropped: our lease lapsed before we took it and it went back in line", key)
        return None

    def queues_with_handoffs(self) -> list[str]:
        """The queues with hand-offs received and not delivered yet."""
        return [queue for queue, park in list(self._parks.items()) if park.handed]

    def held_keys(self) -> list[str]:
        """Unacked keys of the hand-offs received and not delivered yet (consumer.py)."""
        with self._lock:
            return [key for park in self._parks.values() for key, _ in park.handed]

    def arriving(self, key: str) -> bool:
        """True if our parked key on ``key``'s queue names it: a hand-off whose watch event is still
        on its way to us (one read)."""
        park = self._parks.get(self.keys.queue_of(key))
        if park is None:
            return False
        kvs = ops.get(self.client, park.key).kvs
        return bool(kvs) and kvs[0].value != IDLE and parse_record(kvs[0].value)[0] == key

    def give_back(self, queue: str) -> list[str]:
        """Take every hand-off not delivered on ``queue``; their unacked keys, for the caller to requeue."""
        park = self._parks.get(queue)
        if park is None:
            return []
        with self._lock:
            handed = [key for key, _ in park.handed]
            park.handed.clear()
            park.lapsed.clear()
        return handed

    def _still_ours(self, key: str, adopted: str) -> str | None:
        """Which of ``adopted`` and ``key`` etcd still has (None: neither). A hand-off still under our lapsed
        lease (it came after the lease's adoption moved the rest) is moved under the current one first, as the
        adoption would have: acks and SUCCESS writes delete through the current lease (``current_key``), so
        under the old one its ack would delete nothing and a later sweep would run it again."""
        if ops.get(self.client, adopted, keys_only=True).kvs:
            return adopted
        if adopted == key:
            return None
        kv = ops.first_kv_of(ops.get(self.client, key))
        if kv is None:
            return None
        moved = ops.txn(self.client, [ops.compare(key, "mod_revision", kv.mod_revision)],
                        [ops.delete(key), ops.put(adopted, kv.value)])
        return adopted if moved.succeeded else None  # else a sweeper put it back in line meanwhile

    def park(self, queue: str, lease_id: int) -> None:
        """Tell publishers we wait on ``queue`` (it is empty and we have room); no-op if parked."""
        park = self._parks.get(queue)
        if park is None:
            park = self._start(queue)
            if park is None:
                return
        with self._lock:
            if park.parked or park.handed:
                return
            mod = park.mod
        response = ops.txn(self.client, [ops.compare(park.key, "mod_revision", mod)],
                           [ops.put(park.key, IDLE, lease_id)])
        if not response.succeeded:  # a hand-off we have not seen yet: its event is on its way
            return
        with self._lock:
            revision = response.header.revision
            if park.seen <= revision:  # else newer news of the key (its event) came first
                park.seen = park.mod = revision
                park.parked = True

    def _start(self, queue: str) -> _Park | None:
        """Follow our parked key for ``queue`` before the first park (a hand-off must reach us)."""
        park = _Park(self.keys.parked_consumer(queue, self._token))
        hub = self._hub()
        park.watch = hub.subscribe(park.key, lambda events: self._on_events(queue, park, events), label="parked",
                                   on_resync=lambda: self._resync(queue, park))
        if not hub.wait_created(park.watch, timeout=self._timeout):
            hub.unsubscribe(park.watch)
            return None
        with self._lock:
            self._parks[queue] = park
        return park

    def _on_events(self, queue: str, park: _Park, events) -> None:
        with self._lock:
            handed = [self._apply(queue, park, event.kv if event.type == EVENT_PUT else None, event.kv.mod_revision)
                      for event in events]
        if any(handed):
            self._wake()

    def _resync(self, queue: str, park: _Park) -> int:
        """The watch fell behind etcd's compaction: read the key, so a hand-off in the gap still reaches us."""
        response = ops.get(self.client, park.key)
        kv = response.kvs[0] if response.kvs else None
        with self._lock:
            handed = self._apply(queue, park, kv, kv.mod_revision if kv is not None else response.header.revision)
        if handed:
            self._wake()
        return response.header.revision

    def _apply(self, queue: str, park: _Park, kv: Any | None, revision: int) -> bool:
        """Our parked key is ``kv`` (None: deleted) at ``revision``; True if it brought a hand-off."""
        if revision <= park.seen:
            return False  # our own park, already known from its response
        park.seen = revision
        if kv is None:  # gone with our lease, or the queue was deleted
            park.parked, park.mod = False, 0
            park.lapsed.update(key for key, _ in park.handed)  # a sweeper may put these back in line
            return False
        park.mod = revision
        if kv.value == IDLE:  # only we write it: our park, its event before its response
            park.parked = True
            return False
        park.parked = False
        if self._parks.get(queue) is not park:  # withdrawn: the withdrawal puts it back
            return False
        park.handed.append(parse_record(kv.value))
        return True

    def withdraw(self, queue: str, requeue: Callable[[str], None], withdraw_later: Callable[[str, int], None]) -> None:
        """We stop consuming ``queue``: hand-offs not delivered go back, and so will the park."""
        with self._lock:
            park = self._parks.pop(queue, None)
            if park is None:
                return
            handed, seen = list(park.handed), park.mod
            park.handed.clear()
        if park.watch is not None:
            self._hub().unsubscribe(park.watch)
        for key, _ in handed:
            requeue(key)
        withdraw_later(park.key, seen)

    def withdraw_all(self, requeue: Callable[[str], None], withdraw_later: Callable[[str, int], None]) -> None:
        for queue in list(self._parks):
            self.withdraw(queue, requeue, withdraw_later)


def withdraw(client: Any, key: str, seen: int, requeue: Callable[[str], None]) -> None:
    """Delete parked ``key``; a hand-off written after mod_revision ``seen`` (never taken by its
    consumer) is requeued."""
    while True:
        response = ops.txn(client, [ops.compare(key, "mod_revision", seen)], [ops.delete(key)], [ops.range_(key)])
        if response.succeeded:
            return
        kv = ops.first_kv(response.responses[0])
        if kv is None:
            return  # gone with its lease
        if kv.value != IDLE:
            requeue(parse_record(kv.value)[0])
        seen = kv.mod_revision


# -------------------- event_loop: How the transport delivers: kombu's event loop (a Celery worker's hub) or
#   ``drain_events``.
#
# A wake-up pipe that the watch thread, acks and prefetch changes write to joins the worker's hub
# (as kombu's redis.py does with its sockets); plain kombu consumers wait on a watch-fed event.
#
# The safety re-check (every SAFETY_RECHECK_SECONDS) costs one read whatever the number of queues:
# it reads etcd's current revision (a count-only read of one key) and asks the watch hub's stream
# for a progress answer (a message on the stream, no request). If the answer comes within
# PROGRESS_WAIT_SECONDS at or past that revision, every put up to the check reached our queue
# watches and the delayed mover's (delayed.py) and nothing is re-read; if not (a stuck or broken
# stream), every consumed queue is read again (``forget_reads``), as before, the mover reads every
# followed queue's earliest due time again, and the lease sweeps every queue for a dead consumer's
# messages (its consumer watch is on the same stream). A reconnect or a compacted watch forgets
# reads at once (offers.QueueFeed.on_created), so the re-check only has to catch a stream that
# stopped delivering.


#: An idle consumer re-checks its queues this often even without a watch event (safety net only).
SAFETY_RECHECK_SECONDS = 30.0
#: How long the watch stream may take to answer a re-check's progress request (else reads are forgotten).
PROGRESS_WAIT_SECONDS = 5.0
#: Most messages delivered per event-loop wake-up before the hub serves its other fds again.
DELIVERIES_PER_WAKE = 64


class EventLoopMixin:
    """Wake-up pipe, hub registration and ``drain_events`` of :class:`etcd_broker.transport.channel.Transport`.

    Needs ``cycle``, ``lease``, ``config``, ``etcd``, ``keys``, ``watch_hub``, ``delayed``, ``forget_reads()``,
    ``on_message_ready()``, ``give_back_handoffs_without_room()`` and the queue watches (below)
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
        (consumer.py: its consumer watch is on the same stream too)."""
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


# -------------------- queue_watch: What the transport knows about its queues between reads: watches, hints
#   and known-empty queues.
#
# One watch per consumed queue (on the process's watch hub) wakes the transport on every put.
# After a read that saw a whole queue, the puts seen since are kept as hints (claimable without a
# range read) and the queue is known empty until a put arrives. Once every hint taken has been
# claimed (by us or by others), the queue is known empty again as of the last put seen, so a lone
# message costs its claim and no range read. A reconnect forgets it all.
#
# Head cursors (issue 19): etcd visits every key of a range read, live or deleted and not yet
# compacted, so a read of the whole ``ready/`` prefix walks the backlog and the tombstones of
# what was claimed. Per watched queue we keep the lowest ready key that may still be live: a read
# that finds the head raises it there; every put the watch hands us (publishes, requeues and
# restores, which go back to their original lower place) lowers it to its key, also one seen
# while a read was under way; :meth:`forget_reads` (a reconnect or a compacted watch, and a 30 s
# safety re-check the stream did not answer, above) drops it, so the next read is of the
# whole prefix again. No timer forgets it otherwise: a put below the cursor (a requeue, a dead
# consumer's message swept back) lowers it by its own event. The transport reads from the cursor
# (channel.py ``_read_ready``).
#
# The watch is the process's, shared by its transports on the queue (offers.QueueFeed): a put
# reaches the one transport it is offered to at once; one offered elsewhere is held back by the
# feed for the offer's grace (neither a hint nor news of the queue until then, and a range read
# skips it). If its delete (a claim by anyone) comes first it is forgotten; else it becomes a
# hint like any put, and we claim it.


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
        """Transports share a consumer lease when they share the client (consumer.py's ``consumer_lease``)."""
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
