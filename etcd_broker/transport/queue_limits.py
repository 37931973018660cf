"""Queue arguments on etcd, as RabbitMQ means them: message TTL, queue expiry, length limits.

* Message TTL (``expiration`` on publish, queue ``message_ttl`` / ``x-message-ttl``): the
  ready key is attached to a lease that etcd revokes at (or just after) the deadline, and
  the deadline is written in the key, so a consumer drops an expired message unread.
* Queue ``expires`` / ``x-expires``: the declared key, and the messages without a TTL of
  their own, hang on one lease that declaring, ``basic_get`` and consuming keep alive;
  etcd deletes them all together when the queue goes unused.
* ``max_length`` / ``x-max-length`` with ``x-overflow`` ``drop-head`` (default) or
  ``reject-publish``: one transaction writes the message only if no other message arrived
  since the count it decided on, dropping the head in the same transaction.
"""
from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from kombu.exceptions import OperationalError

from etcd_broker.core import ops
from etcd_broker.core.client import CONNECTION_ERRORS
from etcd_broker.core.keys import KeySpace
from etcd_broker.core.leases import LeasePool, pool_for
from etcd_broker.exceptions import QueueArgumentError, QueueFull

logger = logging.getLogger(__name__)

#: AMQP 0-9-1 names are short strings: a name RabbitMQ would accept fits in a few hundred key bytes.
MAX_QUEUE_NAME_BYTES = 255
#: Seconds a publisher trusts the queue arguments it read (another process may redeclare).
LIMITS_CACHE_SECONDS = 5.0
#: Seconds the keeper thread waits, with nothing to refresh, before looking again (it is woken
#: whenever a consumer starts or stops; it refreshes each expiring queue every third of its TTL).
KEEP_IDLE_SECONDS = 60.0
#: Seconds before the keeper retries a read or refresh that etcd did not answer.
KEEP_RETRY_SECONDS = 1.0
#: Times a bounded publish re-counts after another publisher or consumer changed the queue.
BOUNDED_PUT_ATTEMPTS = 50
DROP_HEAD = "drop-head"
REJECT_PUBLISH = "reject-publish"
#: Arguments that would change delivery in ways this transport does not implement: refused.
REFUSED_ARGUMENTS = {
    "x-max-length-bytes": "byte limits are not implemented; use x-max-length",
    "x-dead-letter-exchange": "dead-lettering is not implemented",
    "x-dead-letter-routing-key": "dead-lettering is not implemented",
    "x-single-active-consumer": "single active consumer is not implemented",
}


@dataclass(frozen=True)
class QueueLimits:
    """What a queue's declaration asked for (seconds and counts; None: no limit)."""

    message_ttl: float | None = None
    expires: float | None = None
    max_length: int | None = None
    overflow: str = DROP_HEAD

    @classmethod
    def from_arguments(cls, queue: str, arguments: dict[str, Any] | None) -> QueueLimits:
        """Validate RabbitMQ-style arguments (milliseconds) and keep the ones we implement."""
        arguments = arguments or {}
        for name, why in REFUSED_ARGUMENTS.items():
            if arguments.get(name) is not None:
                raise QueueArgumentError(f"queue {queue!r}: argument {name!r} is refused by the etcdv3 transport: {why}")
        overflow = arguments.get("x-overflow") or DROP_HEAD
        if overflow not in (DROP_HEAD, REJECT_PUBLISH):
            raise QueueArgumentError(f"queue {queue!r}: x-overflow must be {DROP_HEAD!r} or {REJECT_PUBLISH!r}, "
                                     f"got {overflow!r}")
        return cls(message_ttl=_millis(queue, arguments, "x-message-ttl", minimum=0),
                   expires=_millis(queue, arguments, "x-expires", minimum=1),
                   max_length=_count(queue, arguments.get("x-max-length")), overflow=overflow)

    @classmethod
    def from_declared(cls, value: bytes | None) -> QueueLimits:
        try:
            return cls(**json.loads(value).get("limits", {})) if value else NO_LIMITS
        except (ValueError, TypeError):
            return NO_LIMITS

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and (k != "overflow" or self.max_length)}


NO_LIMITS = QueueLimits()


def _millis(queue: str, arguments: dict[str, Any], name: str, minimum: int) -> float | None:
    value = arguments.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise QueueArgumentError(f"queue {queue!r}: {name} must be a number of milliseconds >= {minimum}, "
                                 f"got {value!r}")
    return value / 1000


def _count(queue: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise QueueArgumentError(f"queue {queue!r}: x-max-length must be an integer >= 0, got {value!r}")
    return value


def check_queue_name(queue: str) -> None:
    """Refuse names longer than AMQP allows: they would make every key and watch event huge."""
    size = len(queue.encode("utf-8", "surrogatepass"))
    if size > MAX_QUEUE_NAME_BYTES:
        raise QueueArgumentError(f"queue name of {size} bytes (UTF-8) starting {queue[:40]!r} is longer than "
                                 f"the limit of {MAX_QUEUE_NAME_BYTES} bytes (AMQP's); nothing was declared")


def message_deadline(message: dict, limits: QueueLimits, now: float) -> float | None:
    """The epoch second ``message`` expires at: its ``expiration`` (ms) or the queue's TTL, the sooner."""
    ttls = [limits.message_ttl] if limits.message_ttl is not None else []
    expiration = message.get("properties", {}).get("expiration")
    if expiration is not None:
        try:
            ttls.append(max(0.0, float(expiration) / 1000))
        except (TypeError, ValueError):
            raise QueueArgumentError(f"message expiration must be milliseconds, got {expiration!r}") from None
    return now + min(ttls) if ttls else None


class QueueRegistry:
    """One transport's view of queue arguments, the TTL leases, and queue-expiry leases to keep alive."""

    def __init__(self, client: Any, keys: KeySpace) -> None:
        self.client = client
        self.keys = keys
        self._cache: dict[str, tuple[float, QueueLimits, int]] = {}
        self._kept: dict[str, int] = {}  # queue -> consumers on it in this process
        self._expiring: dict[str, tuple[int, float, float]] = {}  # kept queue -> (lease, expires, next refresh)
        self._to_learn: set[str] = set()  # kept queues whose limits the keeper has yet to look at
        self._refreshed: dict[int, float] = {}
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # a consumer started or stopped: the keeper looks again
        self._keeper: threading.Thread | None = None

    @property
    def leases(self) -> LeasePool:
        """The process's lease pool (core/leases.py): message TTLs share one lease per second of deadlines."""
        return pool_for(self.client.config)

    # -- declaring --------------------------------------------------------------------
    def declare(self, queue: str, limits: QueueLimits, auto_delete_lease: int | None) -> None:
        """Write the declared key; a queue with ``expires`` hangs on its own lease (kept if alive)."""
        # An auto-delete queue lives and dies with its consumer's lease, x-expires or not.
        own = self._expiry_lease(queue, limits.expires) if limits.expires is not None and not auto_delete_lease else 0
        info = json.dumps({"auto_delete": bool(auto_delete_lease), "limits": limits.as_dict(), "lease": own})
        ops.run(self.client, ops.put(self.keys.declared(queue), info, auto_delete_lease or own or 0))
        with self._lock:
            self._cache[queue] = (time.monotonic(), limits, own)

    def _expiry_lease(self, queue: str, expires: float) -> int:
        """The queue's live expiry lease, refreshed (redeclaring counts as use), or a new one."""
        value = self._declared(queue)
        old = json.loads(value).get("lease", 0) if value else 0
        if old and self._refresh(old):
            return old
        return ops.grant(self.client, max(1, math.ceil(expires)))

    def _declared(self, queue: str) -> bytes | None:
        """The queue's declared key's value (JSON: auto_delete, limits, lease); None if not declared."""
        kv = ops.first_kv_of(ops.get(self.client, self.keys.declared(queue)))
        return kv.value if kv is not None else None

    def limits(self, queue: str) -> tuple[QueueLimits, int]:
        """The queue's limits and expiry lease (0: none), read from etcd at most every few seconds."""
        with self._lock:
            cached = self._cache.get(queue)
        if cached is not None and time.monotonic() - cached[0] < LIMITS_CACHE_SECONDS:
            return cached[1], cached[2]
        value = self._declared(queue)
        limits = QueueLimits.from_declared(value)
        lease = json.loads(value).get("lease", 0) if value else 0
        with self._lock:
            self._cache[queue] = (time.monotonic(), limits, lease)
        return limits, lease

    def forget(self, queue: str) -> None:
        with self._lock:
            self._cache.pop(queue, None)

    # -- publishing -------------------------------------------------------------------
    def put(self, queue: str, key: str, value: bytes, deadline: float | None, limits: QueueLimits,
            queue_lease: int, guard: Any = None) -> bool:
        """Write one ready message under its TTL lease (or the queue's), within ``max_length``.

        ``guard`` (idempotent.Guard): written once; False if an earlier attempt of this publish stored it.
        """
        for attempt in range(2):
            lease = self.leases.lease_for(deadline) if deadline is not None else queue_lease
            try:
                if limits.max_length is not None:
                    return self._put_bounded(queue, key, value, lease, limits, guard)
                compare, success = [], [ops.put(key, value, lease)]
                if guard is not None:
                    compare, success = [guard.compare()], [*success, guard.put()]
                return ops.txn(self.client, compare, success).succeeded
            except ops.LeaseNotFound:
                if attempt:
                    raise
                if deadline is not None:
                    self.leases.forget(lease)
                else:  # the queue expired under us: publish as to any undeclared queue
                    self.forget(queue)
                    queue_lease = 0
        raise AssertionError("unreachable")

    def _put_bounded(self, queue: str, key: str, value: bytes, lease: int, limits: QueueLimits,
                     guard: Any = None) -> bool:
        prefix = self.keys.ready(queue)
        for _ in range(BOUNDED_PUT_ATTEMPTS):
            head = ops.get(self.client, prefix, prefix=True, keys_only=True, limit=1)
            excess = head.count + 1 - limits.max_length
            if excess > 0 and limits.overflow == REJECT_PUBLISH:
                if guard is not None and ops.get(self.client, guard.key, count_only=True).count:
                    return False  # full of, among others, this very publish's earlier attempt
                raise QueueFull(f"queue {queue!r} holds {head.count} message(s), its x-max-length is "
                                f"{limits.max_length} and x-overflow is {REJECT_PUBLISH!r}: message refused")
            if excess > 1:
                head = ops.get(self.client, prefix, prefix=True, keys_only=True, limit=excess)
                excess = head.count + 1 - limits.max_length  # counted again at this read's revision
            dropped = list(head.kvs)[:max(excess, 0)]
            unchanged = ops.compare(prefix, "mod_revision", head.header.revision + 1, "<")
            unchanged.range_end = ops.range_request(prefix, prefix=True).range_end  # no key added since the count
            compare = [unchanged] + [ops.compare(kv.key, "mod_revision", kv.mod_revision) for kv in dropped]
            success = [ops.put(key, value, lease)] + [ops.delete(kv.key) for kv in dropped]
            failure = []
            if guard is not None:  # the failure branch says whether it failed on our own marker
                compare, success, failure = [*compare, guard.compare()], [*success, guard.put()], [
                    ops.range_(guard.key, count_only=True)]
            response = ops.txn(self.client, compare=compare, success=success, failure=failure)
            if response.succeeded:
                if dropped:
                    logger.info("queue %r at x-max-length %d: dropped %d message(s) from its head",
                                queue, limits.max_length, len(dropped))
                return True
            if guard is not None and ops.count(response.responses[0]):
                return False  # an earlier attempt of this publish was stored
        raise OperationalError(f"queue {queue!r}: {BOUNDED_PUT_ATTEMPTS} bounded publishes in a row lost "
                               "to concurrent writers; try again")

    # -- keeping expiring queues alive while used ---------------------------------------
    def touch(self, queue: str) -> None:
        """``basic_get`` uses the queue: its expiry starts again (at most one refresh per third of it)."""
        limits, lease = self.limits(queue)
        if lease and limits.expires is not None:
            with self._lock:
                due = time.monotonic() - self._refreshed.get(lease, 0.0) > limits.expires / 3
            if due:
                self._refresh(lease)

    def consuming(self, queue: str) -> None:
        """A consumer started on ``queue``: keep its expiry lease alive until the last one stops."""
        with self._wake:
            self._kept[queue] = self._kept.get(queue, 0) + 1
            self._to_learn.add(queue)
            self._wake.notify()
            if self._keeper is None:
                self._keeper = threading.Thread(target=self._keep_loop, name="etcd-queue-expiry", daemon=True)
                self._keeper.start()

    def cancelled(self, queue: str) -> None:
        with self._wake:
            if self._kept.get(queue, 0) <= 1:
                self._kept.pop(queue, None)
                self._expiring.pop(queue, None)
                self._to_learn.discard(queue)
                self._wake.notify()
            else:
                self._kept[queue] -= 1

    def _keep_loop(self) -> None:
        """Refresh the expiry leases of consumed queues, each when a third of its TTL has passed.

        One timer for all: the thread sleeps until the next refresh is due (or a consumer
        starts or stops). A consumed queue without ``expires`` costs nothing after its limits
        are learnt (from the cache its declaration filled); idle cost does not grow with queues.
        Ends when no consumer is left.
        """
        while True:
            with self._wake:
                if not self._kept:
                    self._keeper = None
                    return
                learn, self._to_learn = self._to_learn, set()
            retry = any([not self._learn(queue) for queue in learn])
            now = time.monotonic()
            with self._wake:
                due = [q for q, (_, _, at) in self._expiring.items() if at <= now]
            for queue in due:
                retry = not self._keep(queue) or retry
            with self._wake:
                if self._to_learn:
                    continue
                next_at = min((at for _, _, at in self._expiring.values()), default=now + KEEP_IDLE_SECONDS)
                wait = min(next_at, now + KEEP_RETRY_SECONDS) if retry else next_at
                if self._kept:
                    self._wake.wait(max(0.0, wait - time.monotonic()))

    def _learn(self, queue: str) -> bool:
        """Note whether ``queue`` has an expiry lease to keep; False (try again) if etcd did not answer."""
        try:
            limits, lease = self.limits(queue)
        except CONNECTION_ERRORS as exc:
            logger.info("queue %r expiry not read: %s", queue, exc)
            with self._wake:
                if queue in self._kept:
                    self._to_learn.add(queue)
            return False
        with self._wake:
            if queue in self._kept and lease and limits.expires is not None:
                self._expiring[queue] = (lease, limits.expires, time.monotonic() + limits.expires / 3)
            else:
                self._expiring.pop(queue, None)
        return True

    def _keep(self, queue: str) -> bool:
        """Refresh ``queue``'s lease once; a lease etcd no longer knows sends the queue to be learnt again
        (it expired or was redeclared). False if etcd did not answer (the refresh is retried soon)."""
        with self._wake:
            entry = self._expiring.get(queue)
        if entry is None:
            return True
        lease, expires, _ = entry
        try:
            alive = self._refresh(lease)
        except CONNECTION_ERRORS as exc:
            logger.info("queue %r expiry not refreshed: %s", queue, exc)
            return False
        with self._wake:
            if queue not in self._expiring:
                return True
            if alive:
                self._expiring[queue] = (lease, expires, time.monotonic() + expires / 3)
            else:
                self._expiring.pop(queue, None)
                self._to_learn.add(queue)
        if not alive:
            self.forget(queue)
        return True

    def _refresh(self, lease: int) -> bool:
        """Keep ``lease`` alive once; False if etcd no longer knows it."""
        alive = ops.keep_alive(self.client, lease) > 0
        with self._lock:
            self._refreshed[lease] = time.monotonic()
        return alive
