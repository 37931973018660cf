"""Hand-off: a publish that goes straight to an idle consumer, its claim in the same transaction.

Every etcd write is a Raft proposal and a disk sync. A message for an idle worker used to cost
two on its way: the publish, then the consumer's claim. Here an idle consumer *parks* on the
queue: it writes ``<queue>/parked/<token>`` (empty value, attached to its lease) once it knows
the queue is empty and it has prefetch room. A publisher that knows a parked consumer (it follows
the queue's parked keys through the watch hub) writes the message in one transaction that

* if the parked key is unchanged since it was parked (its mod_revision): puts the message under
  the consumer's ``unacked/<lease>/`` (claimed, exactly as a claim transaction leaves it) and
  overwrites the parked key with a hand-off record (the unacked key and the message);
* else: puts the message under ``ready/``, as any publish does.

So the publish returns once the message is durable, as before, and the consumer learns of it
from the watch event on its parked key (which carries the message): no claim transaction, no
read. Guarantees are those of a claim: the message lives without a lease under the consumer's
``unacked/<lease>/``, so if the consumer dies its lease lapses and the sweeper puts the message
back in line; one parked key takes one message (the compare); a consumer parks only with room
under its prefetch limit (a hand-off that finds the room taken meanwhile waits, claimed, until a
slot frees, as a prefetched message does). A hand-off still waiting when the consumer's lease
lapses (a partition longer than the TTL) is delivered afterwards only if etcd says it is still the
consumer's: the sweeper may have put it back in line for another worker. A consumer that stops
consuming a queue withdraws its park: the key is deleted if it is unchanged, and a hand-off it
never took is put back in line.

Only consumers inside an event loop (a Celery worker) park, and only publishes without TTL,
queue limits or ``Producer.batch()``, of at most HANDOFF_MAX_BYTES, are handed off.
"""
from __future__ import annotations

import logging
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from etcd_broker.core import forking, ops
from etcd_broker.core.keys import KeySpace
from etcd_broker.core.watch import EVENT_PUT, Watch, WatchHub

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


_views = forking.PerProcess()


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
        """Unacked keys of the hand-offs received and not delivered yet (reconcile.py)."""
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
