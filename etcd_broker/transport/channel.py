"""etcd v3 transport for kombu (and so for Celery).

Features
========
* Type: Virtual
* Supports Direct: Yes
* Supports Topic: Yes
* Supports Fanout: Yes (bindings live in etcd, so broadcast reaches other hosts)
* Supports Priority: Yes, 0-9, 9 the most urgent (AMQP's meaning)
* Supports TTL: Yes (message `expiration`, queue `x-message-ttl` and `x-expires`, on etcd leases;
  `x-max-length` with drop-head or reject-publish)

Messages wait under ``ready/<band>/<seq>`` and are claimed by one etcd
transaction that moves them under the consumer's lease (``unacked/<lease>/``);
no locks, no visibility timeout. A consumer that dies loses its lease and its
messages go back to the queue at their original place. Waiting consumers are
woken by an etcd watch; nothing polls. See docs/transport.md.

Asynchronous: in a Celery worker the transport joins kombu's event loop (the hub)
through a wake-up pipe that the watch thread, acks and prefetch changes write to,
so a worker whose pool is full still answers control messages (docs/operators.md).
Plain kombu consumers keep the synchronous ``drain_events``.

Connection string
=================
.. code-block::

    etcdv3://[USER:PASSWORD@]HOST:PORT[/VHOST]
    etcdv3://h1:2379;etcdv3://h2:2379;etcdv3://h3:2379     (several endpoints)

Transport options
=================
Checked when the transport is made (options.py): a wrong type or value raises ``EtcdConfigError``
naming it. Options of kombu and Celery themselves pass untouched.

* ``prefix``: key prefix for everything (default ``/deephardway``).
* ``lease_ttl``: seconds before a dead consumer's messages are requeued (default 10).
* ``max_message_bytes``: larger messages are refused at publish (default just under 1.5 MiB),
  unless they expire (large_body.py).
* ``reconcile_seconds``: how often a live consumer gives back what its lease owns and nobody here
  holds, and how long such a message stays unheld first (default 30; consumer.py).
* ``delayed_delivery``: Celery tasks due later (``countdown``, ``eta``) wait in etcd until due,
  not in a worker's memory (default True; delayed.py).
* ``default_priority``: priority 0-9 of a message sent with ``priority=None`` (default 0).
* ``idempotent_publish``: a publish retried after an ambiguous failure (kombu's ``ensure``) is
  stored once: each publish writes a short-lived marker in its transaction (default True).
* ``endpoints``: extra endpoints, ``["h2:2379", ...]``, besides the URL's.
* ``user``, ``password``, ``ca_cert``, ``cert_key``, ``cert_cert``, ``timeout``: see client.py.

Sections of this module: :class:`Channel` and :class:`Transport` first, then *idempotent* (a publish
id and its short-lived marker, so a retried publish is stored once) and *queue_limits* (queue
arguments: TTL, expiry, ``x-max-length``, queue names).
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from queue import Empty
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import etcd3
import grpc
from etcd3 import etcdrpc
from kombu.exceptions import OperationalError
from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments
from kombu.utils.json import dumps

from etcd_broker.core import ops
from etcd_broker.core.client import (
    CONNECTION_ERRORS,
    ETCD_OPTIONS,
    EtcdConfig,
    EtcdUnreachable,
    get_client,
    inherited,
    is_request_too_large,
    wait_connected,
)
from etcd_broker.core.ops import DEFAULT_PREFIX, KeySpace, LeasePool, Sequence, pool_for, range_end
from etcd_broker.core.watch import WatchHub, hub_for
from etcd_broker.exceptions import MessageTooLarge, QueueArgumentError, QueueFull
from etcd_broker.transport import delayed, large_body
from etcd_broker.transport.bindings import BindingTable
from etcd_broker.transport.consumer import (
    DEFAULT_LEASE_TTL,
    RECONCILE_SECONDS,
    ConsumerLease,
    QoS,
    consumer_lease,
    hold_for_result,
    is_executing,
    keep,
    kept_keys,
    release_held,
    restore_message,
    worker_stopping,
)
from etcd_broker.transport.delivery import (
    CLAIM_BATCH,
    HANDOFF_MAX_BYTES,
    EventLoopMixin,
    ParkedConsumers,
    Parking,
    QueueWatchMixin,
    handoff_ops,
    parked_consumers,
)
from etcd_broker.transport.expired import revoke_expired
from etcd_broker.transport.options import check_options

if TYPE_CHECKING:
    from etcd_broker.transport.publish_batch import PublishBatch

logger = logging.getLogger(__name__)


# -------------------- channel: kombu's Channel and Transport (the module docstring above); then
# the idempotent publish and the queue arguments they use.

#: etcd refuses requests over 1.5 MiB (--max-request-bytes); keep 4 KiB for key and framing.
DEFAULT_MAX_MESSAGE_BYTES = 1_572_864 - 4_096
#: Least seconds between two connects of one kombu connection (the first is at once): kombu's ensure() retries
#: a failed publish right after a reconnect that worked, ours takes milliseconds, so a write that etcd keeps
#: refusing fast (proposals dropped while leadership moves) would spend 120 retries in under a second.
RECONNECT_GAP_SECONDS = 0.25
#: kombu connection -> when it last connected (monotonic); kombu makes a new Transport for each reconnect.
_connected_at: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: Most message bytes claimed in one transaction (etcd refuses requests over 1.5 MiB).
CLAIM_BATCH_BYTES = 1_048_576
#: Reads in one _get after other consumers won the messages we read (then the loop looks again soon).
CLAIM_ATTEMPTS = 4
#: The first window of a head read from a queue's cursor, in sequence units (ns of publish time, ops.py):
#: 10 ms of a queue fed at 1,000/s holds 10 messages, whatever backlog waits behind them.
HEAD_WINDOW_NS = 10_000_000
#: Each empty window is followed by one this many times wider (10 ms, 160 ms, 2.56 s).
HEAD_WINDOW_GROWTH = 16
#: Windows tried before a head read runs from the cursor to the end of the queue.
HEAD_WINDOWS = 3
#: Ready keys a claim also reads, beyond as many as it claims, for the next claim (one round trip per claim).
READ_AHEAD_EXTRA = 4


class Channel(virtual.Channel):
    """One kombu channel over the transport's shared etcd client."""

    QoS = QoS
    supports_fanout = True

    #: Refuse larger messages at publish time.
    max_message_bytes = DEFAULT_MAX_MESSAGE_BYTES
    #: Celery tasks with a future ``eta`` (countdown) wait in etcd until due, not in a worker (delayed.py).
    delayed_delivery = True
    #: A publish retried after an ambiguous failure is stored once (a marker per publish).
    idempotent_publish = True

    from_transport_options = virtual.Channel.from_transport_options + (
        "max_message_bytes", "default_priority", "delayed_delivery", "idempotent_publish",
    )

    def __init__(self, connection, **kwargs):
        super().__init__(connection, **kwargs)
        self.keys = connection.keys
        self.client = connection.etcd
        self._transport = connection  # kombu sets self.connection to None at close; acks come later
        self._auto_delete: set[str] = set()
        self._no_ack_queues: set[str] = set()
        self._consumer_queues: dict[str, str] = {}  # consumer tag -> queue
        self._buffer: dict[str, deque] = {}
        self._ahead: dict[str, list] = {}  # queue -> the head our last claim read after it (_claim)
        self._single_get = False

    # -- publishing -------------------------------------------------------------
    def basic_publish(self, message, exchange, routing_key, **kwargs):
        """Publish, named once across kombu's retries of it : a retry after an
        ambiguous failure finds the first attempt's marker and stores nothing again."""
        if self.idempotent_publish:
            name_publish(message, self.connection.sequence.next)
        result = super().basic_publish(message, exchange, routing_key, **kwargs)
        published(message)
        return result

    def _put(self, queue, message, **kwargs):
        check_queue_name(queue)
        priority = self._get_message_priority(message)
        limits, queue_lease = self.connection.queues.limits(queue)
        now = time.time()
        deadline = message_deadline(message, limits, now)
        eta = (message.get("headers") or {}).get("eta")  # only a task with an ETA may wait in delayed/
        due = delayed.due_time(message, now) if eta and self.delayed_delivery else None
        if deadline is not None and (deadline <= now or (due is not None and deadline <= due)):
            revoke_expired(message)  # expired already, or before it is due: dropped, as a claim would drop it
            return
        publish_id = publish_id_of(message)
        seq = publish_id or self.connection.sequence.next()
        value, chunks = dumps(stored_form(message)).encode(), []
        if len(value) > self.max_message_bytes and deadline is not None:  # its body beside it (large_body.py)
            value, chunks = large_body.split(stored_form(message), self.keys, queue, seq)
        self._check_size(queue, value)
        position = self.keys.position(priority, seq, deadline)
        key = self.keys.ready_message(queue, position)
        batch = kwargs.get("_publish_batch")
        for attempt in range(2):
            guard = publish_guard(self.client, self.keys, queue, publish_id) if publish_id is not None else None
            try:
                stored = self._write(queue, position, key, value, chunks, deadline, due, limits, queue_lease, batch,
                                     guard)
                break
            except ops.LeaseNotFound:
                if guard is None or attempt:
                    raise
                forget_lease(self.client, guard.lease)  # refused, so not written: again, new lease
            except grpc.RpcError as exc:
                raise _too_large_or(exc, queue, len(value), self.max_message_bytes) from None
        if not stored:
            note_retry(queue, guard.key)

    def _write(self, queue, position: str, key: str, value: bytes, chunks: list, deadline: float | None,
               due: float | None, limits, queue_lease: int, batch: PublishBatch | None,
               guard: Guard | None) -> bool:
        """One attempt of :meth:`_put`'s write, by path. False: ``guard``'s marker says an earlier attempt
        of this publish stored it (True for a put buffered in a ``Producer.batch()``)."""
        if due is not None and not chunks and not queue_lease and limits.max_length is None:
            if batch is not None:
                batch.flush()  # keep publish order: what came before is written first
            return delayed.put(self.client, self.connection.queues.leases,
                               self.keys.delayed_message(queue, due, position), value, deadline, guard)
        if deadline is None and not queue_lease and limits.max_length is None:
            if batch is not None:
                # Producer.batch(): written with others in one transaction (one marker per transaction)
                batch.add(key, value, guard and guard.key)
                return True
            return self._put_plain(queue, position, key, value, guard)
        if batch is not None:
            batch.flush()  # keep publish order: what came before is written first
        if chunks:
            large_body.put_chunks(self.client, chunks, self.connection.queues.leases.lease_for(deadline))
        return self.connection.queues.put(queue, key, value, deadline, limits, queue_lease, guard)

    def _put_plain(self, queue, position: str, key: str, value: bytes, guard: Guard | None) -> bool:
        """The common case: one put, straight to an idle consumer if one is parked (delivery.py); concurrent
        publishers share a transaction. False: ``guard``'s marker says an earlier attempt stored it."""
        park = self.connection.parked.pick(queue) if len(value) <= HANDOFF_MAX_BYTES else None
        if park is not None:
            compare, success, failure = handoff_ops(self.keys, queue, position, value, key, park)
            if guard is not None:  # the hand-off's own compare decides between its branches, inside
                compare, success, failure = [guard.compare()], [guard.put(), ops.nested_txn(
                    compare, success, failure)], []
        else:
            compare, success, failure = [], [ops.put(key, value)], []
            if guard is not None:
                compare, success = [guard.compare()], [*success, guard.put()]
        return ops.shared(self.client).txn(compare, success, failure).succeeded or guard is None

    def _put_fanout(self, exchange, message, routing_key, **kwargs):
        for queue in {queue for _, _, queue in self.get_table(exchange)}:
            self._put(queue, message, **kwargs)

    def create_publish_batch(self, max_size: int) -> PublishBatch:
        """kombu's ``Producer.batch()``: puts buffered and written a transaction at a time."""
        from etcd_broker.transport.publish_batch import PublishBatch  # it builds on this module's guard
        return PublishBatch(self, max_size)

    def _check_size(self, queue, value: bytes) -> None:
        if len(value) > self.max_message_bytes:
            raise MessageTooLarge(
                f"message for queue {queue!r} is {len(value)} bytes encoded; the limit is "
                f"{self.max_message_bytes} bytes (etcd --max-request-bytes); nothing was written. "
                "Store large inputs elsewhere and send a reference.")

    # -- consuming ------------------------------------------------------------------
    def _get(self, queue, timeout=None):
        buffered = self._buffer.get(queue)
        if buffered:
            return buffered.popleft()
        lease_id = self.lease.ensure(queue)  # lists the queue in our consumer key before any claim (the sweep)
        if not self._single_get:  # what the consume watches tell is for consumers; a synchronous get reads
            # claimed by its publisher; checked with etcd while our lease is in doubt
            while (handed := self.connection.parking.take(queue, self.lease.current_key,
                                                          self.lease.in_doubt())) is not None:
                message = self._decode(queue, handed[1], handed[0])
                if message is not None:
                    return message
        ahead = None if self._single_get else self._take_read_ahead(queue)
        hints = None if self._single_get else self.connection.take_hints(queue)
        if hints is None and not self._single_get and self.connection.known_empty(queue):
            self._park(queue, lease_id)
            raise Empty()
        # Hints hold every put since the queue was known empty: claimed straight from the watch
        # events, no range read. Once all are settled the queue is known empty again.
        candidates, token = hints if hints is not None else (ahead, None)
        for _ in range(CLAIM_ATTEMPTS):
            if not candidates:
                if token is not None:  # every hinted message is ours or another consumer's
                    self.connection.hints_settled(queue, token)
                    self._park(queue, lease_id)
                    raise Empty()
                candidates = self._read_ready(queue)
                if not self._single_get:  # puts offered to another consumer wait out their grace first
                    candidates = self.connection.skip_held(queue, candidates)
                if not candidates:
                    self._park(queue, lease_id)
                    raise Empty()
            messages, candidates = self._claim_many(queue, candidates, lease_id,
                                                    read_ahead=token is None and not self._single_get)
            if messages:
                if candidates:  # more than our room: read them next time
                    self.connection.unread(queue)
                elif token is not None:
                    self.connection.hints_settled(queue, token)
                self._buffer.setdefault(queue, deque()).extend(messages[1:])
                return messages[0]
        self.connection.unread(queue)  # still losing races: read again soon, not only at the next put
        self.connection.wake()
        raise Empty()

    def _park(self, queue, lease_id: int) -> None:
        """Idle on an empty queue inside an event loop: let publishers hand us its next message (delivery.py)."""
        if self.connection.in_event_loop and queue in self._consumer_queues.values() \
                and queue not in self._no_ack_queues and self.connection.known_empty(queue):
            try:
                self.connection.parking.park(queue, lease_id)
            except CONNECTION_ERRORS as exc:  # parking is an optimisation: the watch still wakes us
                logger.debug("could not park on queue %r: %s", queue, exc)
            except ops.LeaseNotFound:  # our lease lapsed unnoticed (a cut longer than its TTL): this ended the
                self.lease.lost(lease_id)  # worker (chaos test); re-register, park at the next empty read

    def has_room_for(self, queue) -> bool:
        """True if this channel consumes ``queue`` and may take a message now (prefetch room)."""
        return not self.closed and queue in self._consumer_queues.values() and self.qos.can_consume()

    def _allowance(self) -> int:
        """How many messages we may claim now: one for a get, else the prefetch room (at most a batch).

        Without a prefetch limit we claim one at a time: what we hold is what we deliver, so
        ``qsize`` counts what other consumers can still get, and idle consumers share a backlog.
        """
        if self._single_get:
            return 1
        room = self.qos.can_consume_max_estimate()
        return 1 if room is None else max(1, min(room, CLAIM_BATCH))

    def _read_ready(self, queue) -> list[tuple[bytes, bytes, int]]:
        """The head of ``queue``: up to our allowance of ready messages, most urgent and oldest first.

        Read from the queue's cursor (delivery.py), first through windows of publish time
        (etcd walks every key of a range, a backlog's included; a window bounds the walk), then
        to the end of the queue: only that last read can tell the queue is drained.
        """
        limit = self._allowance()
        prefix = self.keys.ready(queue)
        cursor, token = self.connection.head_read_start(queue)
        rows, covered = [], False
        try:
            response = self._read_windows(cursor, limit) if cursor is not None else None
            drained = False
            if response is None:
                response = ops.get(self.client, cursor or prefix, range_end=range_end(prefix), limit=limit)
                drained = len(response.kvs) < limit
            rows = [(kv.key, kv.value, kv.mod_revision) for kv in response.kvs]
        finally:  # a failed read learns nothing, but ends its watch on the cursor
            covered = self.connection.head_read_end(queue, token, rows[0][0] if rows else None)
        # a put that landed below the cursor during the read is not in it: not drained, read again
        self.connection.after_read(queue, response.header.revision, drained=drained and covered)
        return rows

    def _read_windows(self, cursor: bytes, limit: int):
        """The first non-empty of the windows of the cursor's band that start at it (None: all empty)."""
        width = HEAD_WINDOW_NS
        for _ in range(HEAD_WINDOWS):
            response = ops.get(self.client, cursor, range_end=self.keys.window_end(cursor, width), limit=limit)
            if response.kvs:
                return response
            width *= HEAD_WINDOW_GROWTH
        return None

    def _take_read_ahead(self, queue) -> list | None:
        """The head our last claim of ``queue`` read after it, unless a put landed below it since."""
        rows = self._ahead.pop(queue, None)
        if not rows or not self.connection.still_head(queue, rows[0][0]):
            return None  # a more urgent (or requeued) message came, or reads were forgotten: read again
        return self.connection.skip_held(queue, rows)

    def _claim_many(self, queue, candidates, lease_id: int, read_ahead: bool = False) -> tuple[list[dict], list]:
        """Claim what our allowance permits in one transaction (``read_ahead``: see :meth:`_claim`).

        Returns the messages, and the candidates still worth trying when another consumer
        won some of the batch: the ones it left, then those beyond the batch.
        """
        batch, size = [], 0
        for row in candidates[:self._allowance()]:  # watch hints can outnumber our prefetch room
            if batch and size + len(row[1]) > CLAIM_BATCH_BYTES:
                break
            batch.append(row)
            size += len(row[1])
        messages, left = self._claim(queue, batch, lease_id, read_ahead) if batch else ([], [])
        return messages, left + candidates[len(batch):]

    def _claim(self, queue, rows, lease_id: int, read_ahead: bool = False) -> tuple[list[dict], list]:
        """The ready keys unchanged and our lease alive -> all of them are ours, atomically.

        Messages past the deadline in their key are deleted in the same transaction, unread.
        If the transaction fails, its failure branch reads which rows nobody took (returned
        second), so a loser retries those without a range read of the queue. With ``read_ahead``
        and a head cursor, a successful transaction also reads the queue's head after its deletes
        (the first window of :meth:`_read_ready`, under the same cursor token): the next get
        claims those rows without a read, unless a put lands below them meanwhile (:meth:`_take_read_ahead`).
        """
        consumer_key = self.keys.consumer(lease_id)
        no_ack = queue in self._no_ack_queues
        now = time.time()
        compare = [ops.compare(consumer_key, "version", 0, ">")]
        success, taken, expired = [], [], []
        for key, value, revision in rows:
            key = key.decode()
            compare.append(ops.compare(key, "mod_revision", revision))
            success.append(ops.delete(key))
            deadline = self.keys.deadline_of(key)
            if deadline is not None and deadline <= now:
                expired.append(value)  # expired (TTL): dropped, as RabbitMQ drops it at the head of the queue
                continue
            unacked = None if no_ack else self.keys.unacked_message(queue, lease_id, self.keys.position_of(key))
            if unacked:
                success.append(ops.put(unacked, value))
            taken.append((value, unacked))
        cursor, read = self.connection.head_read_start(queue, from_cursor=True) if read_ahead else (None, None)
        if read is not None:  # the range sees this transaction's deletes: the head after our claim
            biggest = max(len(row[1]) for row in rows)  # the next ones are likely as big: a reply of ~a claim's bytes
            success.append(ops.range_(cursor, range_end=self.keys.window_end(cursor, HEAD_WINDOW_NS), limit=min(
                CLAIM_BATCH, len(rows) + READ_AHEAD_EXTRA, max(1, CLAIM_BATCH_BYTES // max(biggest, 1)))))
        ahead = []
        try:
            failure = [ops.range_(consumer_key, count_only=True)] + [ops.range_(row[0], keys_only=True) for row in rows]
            response = ops.txn(self.client, compare, success, failure)
            if read is not None and response.succeeded:
                ahead = [(kv.key, kv.value, kv.mod_revision) for kv in response.responses[-1].response_range.kvs]
        except CONNECTION_ERRORS:
            for _, unacked in taken:  # it may have been applied: give back whatever it took
                if unacked:
                    self.lease.requeue_later(unacked)
            raise
        finally:  # as _read_ready: a put seen below the cursor meanwhile means the rows are not the head
            if read is not None and self.connection.head_read_end(queue, read, ahead[0][0] if ahead else None) \
                    and ahead:
                self._ahead[queue] = ahead
        if not response.succeeded:
            if not ops.count(response.responses[0]):
                self.lease.lost(lease_id)
                self.connection.unread(queue)  # nothing claimed: the next get reads the queue again
                return [], []
            return [], [row for row, read in zip(rows, response.responses[1:], strict=True)
                        if (kv := ops.first_kv(read)) is not None and kv.mod_revision == row[2]]
        for value in expired:  # ours to drop: the transaction deleted them
            revoke_expired(value)
        return [m for value, unacked in taken if (m := self._decode(queue, value, unacked)) is not None], []

    def _decode(self, queue, value: bytes, unacked: str | None) -> dict | None:
        try:
            message = json.loads(value)
            if large_body.FIELD in message:  # a large expiring message: its body in chunks beside it
                message = large_body.join(self.client, message, discard=unacked is None)
            message["properties"]["delivery_info"]["etcd_key"] = unacked
        except CONNECTION_ERRORS:
            if unacked:  # claimed but not delivered: back in line once etcd answers
                self.lease.requeue_later(unacked)
            return None
        except (ValueError, KeyError, TypeError) as exc:  # large_body.BodyMissing too
            self._dead_letter(queue, unacked, value, exc)
            return None
        task_id = (message.get("headers") or {}).get("id")
        if unacked and isinstance(task_id, str):  # its SUCCESS write may delete it (consumer.py)
            hold_for_result(task_id, unacked, self.client, self.lease.current_key)
        return message

    def held_keys(self) -> list[str]:
        """Unacked keys this channel holds: delivered and not settled, or claimed and not delivered yet."""
        buffered = [raw["properties"]["delivery_info"].get("etcd_key") for queue in list(self._buffer)
                    for raw in list(self._buffer.get(queue, ()))]
        return [key for key in buffered if key] + (self.qos.held_keys() if not self.closed else [])

    def _requeue_buffered(self, queue=None) -> None:
        for name in [queue] if queue is not None else list(self._buffer):
            for raw in self._buffer.pop(name, ()):
                self._requeue_or_later(self.Message(raw, channel=self))

    def close(self):
        if self.connection is not None and inherited(self.connection.owner_pid):
            self._forget_after_fork()
            return
        if not self.closed:
            self._requeue_buffered()
            self._ahead.clear()
        super().close()

    def _forget_after_fork(self) -> None:
        """Closed in a forked child: what it holds (buffered, unacked, consumers) is the parent's."""
        self.closed = True
        self._buffer.clear()
        self._ahead.clear()
        self._consumer_queues.clear()
        self.connection = None

    def _dead_letter(self, queue, key, value: bytes, exc: Exception) -> None:
        dead = self.keys.dead_message(queue, self.connection.sequence.next())
        logger.error("undecodable message on queue %r moved to %s: %s", queue, dead, exc)
        ops.txn(self.client, success=[ops.put(dead, value)] + ([ops.delete(key)] if key else []))

    def _forget(self, message) -> None:
        key = message.delivery_info.get("etcd_key")
        if key and not release_held(message.headers.get("id"), key):  # else deleted with its SUCCESS
            self.lease.delete_later(key)

    def _restore(self, message) -> None:
        """kombu's hook for a requeue (``reject(requeue=True)``, ``restore_unacked`` at close).

        At close (a connection reset), a message whose task is running in this process stays
        under our lease: the task acks it when it ends (consumer.py). Given back, it would run twice.
        """
        if self.closed and is_executing(message.headers.get("id")):
            keep(self, message, self._requeue_later, self._forget)
            logger.info("channel closed while task %s runs here: its message %s stays ours until it acks",
                        message.headers.get("id"), message.delivery_info.get("etcd_key"))
            return
        release_held(message.headers.get("id"), message.delivery_info.get("etcd_key"))
        self._requeue_or_later(message)

    def _requeue_later(self, message) -> None:
        """Give back through the lease's sweeper thread (never blocks the caller on etcd)."""
        key = message.delivery_info.get("etcd_key")
        release_held(message.headers.get("id"), key)
        if key:
            self.lease.requeue_later(key)

    def _requeue_or_later(self, message) -> None:
        """Requeue now; if etcd is unreachable, the lease's sweeper does it once etcd answers.

        Known unreachable, or a stopping worker: no call is tried; the lease's sweeper gives it
        back, and if the process exits first the message stays under our lease and comes back
        when the lease is revoked or expires.
        """
        if worker_stopping():
            key = message.delivery_info.get("etcd_key")
            if key:
                self.lease.requeue_later(key)
            return
        try:
            if not self.lease.reachable():
                raise EtcdUnreachable("consumer lease keepalive unanswered")
            self._requeue(message)
        except CONNECTION_ERRORS:
            key = message.delivery_info.get("etcd_key")
            logger.warning("etcd unreachable: message %s requeued once it answers", key)
            if key:
                self.lease.requeue_later(key)

    def _requeue(self, message) -> None:
        key = message.delivery_info.get("etcd_key")
        if not key:
            return
        key = self.lease.current_key(key)
        kv = ops.first_kv_of(ops.get(self.client, key))
        queue = self.keys.queue_of(key)
        if kv is not None and restore_message(self.client, self.keys, queue, key, kv.value, kv.mod_revision):
            self._transport.put_below(queue, self.keys.ready_message(queue, self.keys.position_of(key)).encode())

    @property
    def lease(self) -> ConsumerLease:
        """The transport's consumer lease (also after close: a task finishing after a reconnect acks through it;
        reading it through ``self.connection``, None by then, was an AttributeError that ended the worker)."""
        return self._transport.lease

    def basic_consume(self, queue, no_ack, callback, consumer_tag, **kwargs):
        self._consumer_queues[consumer_tag] = queue
        if no_ack:
            self._no_ack_queues.add(queue)
        self.lease.add_queue(queue)  # the first grants the lease; the next ensure() lists the rest: 2 writes for Q queues
        self.connection.watch_queue(queue)
        if queue not in self._auto_delete:  # replies and events are never delayed
            self.connection.delayed.follow(queue)  # its ETA tasks move to ready/ when due (delayed.py)
        self.connection.queues.consuming(queue)  # keeps an expiring queue alive (H4)
        return super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)

    def basic_cancel(self, consumer_tag):
        queue = self._consumer_queues.pop(consumer_tag, None)
        result = super().basic_cancel(consumer_tag)
        if queue is not None:
            self._requeue_buffered(queue)
            self.connection.unwatch_queue(queue)
            self.connection.queues.cancelled(queue)  # H4
            if queue in self._auto_delete:
                self._auto_delete.discard(queue)
                # Else it goes with our lease (declared and bound under it; the sweeper that sees the lease
                # go drops its messages): a stopping worker never waits on etcd for it.
                if not worker_stopping() and self.lease.reachable():
                    self.queue_delete(queue)
        return result

    def basic_qos(self, prefetch_size=0, prefetch_count=0, apply_global=False):
        """A larger prefetch count frees room: the event loop may claim again at once."""
        super().basic_qos(prefetch_size, prefetch_count, apply_global)
        self.connection.wake()

    def basic_get(self, queue, no_ack=False, **kwargs):
        """Take exactly one message (no batch claimed ahead for a synchronous get)."""
        if no_ack:
            self._no_ack_queues.add(queue)
        self._single_get = True
        try:
            self.connection.queues.touch(queue)  # a get is a use: an expiring queue lives on
            return super().basic_get(queue, no_ack=no_ack, **kwargs)
        finally:
            self._single_get = False
            if no_ack:
                self._no_ack_queues.discard(queue)

    # -- queues, exchanges, bindings ----------------------------------------------
    def queue_declare(self, queue=None, passive=False, **kwargs):
        if queue:
            check_queue_name(queue)
        if queue and (kwargs.get("auto_delete") or kwargs.get("exclusive")):
            self._auto_delete.add(queue)
        return super().queue_declare(queue, passive=passive, **kwargs)

    def prepare_queue_arguments(self, arguments, **kwargs):
        """``Queue(message_ttl=, expires=, max_length=)`` as RabbitMQ's ``x-`` arguments (kombu's own mapping)."""
        return to_rabbitmq_queue_arguments(arguments, **kwargs)

    def _new_queue(self, queue, arguments=None, **kwargs):
        limits = QueueLimits.from_arguments(queue, arguments)  # refuses bad arguments before any write
        if queue in self.connection.declared and limits.expires is None:
            return
        lease = self.lease.ensure() if queue in self._auto_delete else None
        try:
            self.connection.queues.declare(queue, limits, lease)
        except ops.LeaseNotFound:
            if lease is None:
                raise
            # our consumer lease expired while etcd could not hear us (a partition longer than its TTL) and the
            # keepalive has not said so yet: re-register now; raised, this ended the worker (chaos test)
            self.lease.lost(lease)
            self.connection.queues.declare(queue, limits, self.lease.ensure())
        self.connection.declared.add(queue)

    def _has_queue(self, queue, **kwargs):
        return ops.first_kv_of(ops.get(self.client, self.keys.declared(queue))) is not None

    def _size(self, queue):
        return ops.get(self.client, self.keys.ready(queue), prefix=True, count_only=True).count

    def _purge(self, queue):
        """Every message waiting: ready, and delayed (ETA tasks not due yet)."""
        return sum(ops.run(self.client, ops.delete(prefix, prefix=True)).deleted
                   for prefix in (self.keys.ready(queue), self.keys.delayed(queue)))

    def _delete(self, queue, *args, **kwargs):
        ops.run(self.client, ops.delete(self.keys.queue(queue), prefix=True))
        ops.run(self.client, ops.delete(self.keys.declared(queue)))
        self.connection.bindings.unbind_queue(queue)
        self.connection.declared.discard(queue)
        self.connection.queues.forget(queue)

    def exchange_declare(self, exchange=None, type="direct", *args, **kwargs):
        result = super().exchange_declare(exchange, type, *args, **kwargs)
        if exchange and not kwargs.get("passive"):
            self.connection.remember_exchange(exchange, type)
        return result

    def typeof(self, exchange, default="direct"):
        if exchange not in self.state.exchanges:
            default = self.connection.exchange_type(exchange) or default
        return super().typeof(exchange, default)

    def _queue_bind(self, exchange, routing_key, pattern, queue):
        # Bindings go with their queue: an auto-delete queue's with our lease, an x-expires queue's with its own.
        lease = self.lease.ensure() if queue in self._auto_delete else self.connection.queues.limits(queue)[1] or None
        self.connection.bindings.bind(exchange, routing_key, pattern, queue, lease=lease)

    def queue_unbind(self, queue, exchange=None, routing_key="", arguments=None, **kwargs):
        super().queue_unbind(queue, exchange, routing_key, arguments, **kwargs)
        self.connection.bindings.unbind(exchange or "amq.direct", queue, routing_key)

    def _lookup(self, exchange, routing_key, default=None):
        queues = super()._lookup(exchange, routing_key, default)
        if not queues and exchange and self.typeof(exchange).type == "direct":
            # our copy of the bindings may lag (a reply queue bound a moment ago elsewhere): ask etcd
            self.connection.bindings.refresh(exchange)
            queues = super()._lookup(exchange, routing_key, default)
        if not queues and exchange:
            logger.debug("no queue bound to exchange %r for routing key %r: message dropped", exchange, routing_key)
        return queues

    def get_table(self, exchange):
        return self.connection.bindings.table(exchange)


class Transport(EventLoopMixin, QueueWatchMixin, virtual.Transport):
    """kombu transport for etcd v3: ``kombu.Connection("etcdv3://host:2379")``.

    Delivery through kombu's event loop or ``drain_events`` is delivery.py's; the queue
    watches and what they tell about queue contents are delivery.py's.
    """

    Channel = Channel

    driver_type = "etcd"
    driver_name = "python3-etcd3"
    default_port = 2379
    polling_interval = None

    implements = virtual.Transport.implements.extend(
        asynchronous=True,
        batch_publish=True,  # Producer.batch() (publish_batch.py)
        exchange_type=frozenset(["direct", "topic", "fanout"]),
        heartbeats=False,
    )
    connection_errors = virtual.Transport.connection_errors + CONNECTION_ERRORS
    channel_errors = virtual.Transport.channel_errors
    # What kombu assumes of a transport that declares neither (Connection.recoverable_*), declared: without
    # them kombu's ensure() (Producer.publish(retry=True), Celery's apply_async) gives up on a second error
    # after a reconnect that worked, whatever max_retries says, and a publish is refused within milliseconds
    # while etcd elects a leader (a dropped proposal, then a failed endpoint). With them it retries as told.
    recoverable_connection_errors = connection_errors + channel_errors
    recoverable_channel_errors = ()

    def __init__(self, client, **kwargs):
        check_options(client.transport_options)  # a wrong type or value, named, before anything reads one
        super().__init__(client, **kwargs)
        options = client.transport_options
        self.config = EtcdConfig.from_url(self._urls(client, options),
                                          **{k: options[k] for k in ETCD_OPTIONS if k in options})
        self.etcd = get_client(self.config)
        self.owner_pid = os.getpid()  # the process it belongs to (inherited)
        self.keys = KeySpace(options.get("prefix", DEFAULT_PREFIX), client.virtual_host)
        self.lease_ttl = options.get("lease_ttl", DEFAULT_LEASE_TTL)
        self.reconcile_seconds = options.get("reconcile_seconds", RECONCILE_SECONDS)
        self.sequence = Sequence()
        self.declared: set[str] = set()
        self.queues = QueueRegistry(self.etcd, self.keys)  # queue arguments, TTL leases
        self._exchange_types: dict[str, str] = {}
        self._bindings: BindingTable | None = None
        self._hub: WatchHub | None = None
        self.delayed = delayed.DelayedMover(self.etcd, self.keys, lambda: self.watch_hub)
        self.parking = Parking(self.etcd, self.keys, lambda: self.watch_hub, self.wake, self.config.timeout)
        self._init_event_loop()
        self._init_queue_watch()

    @staticmethod
    def _urls(client, options) -> list[str]:
        if client.alt:
            urls = [url if "://" in url else f"etcdv3://{url}" for url in client.alt]
        else:
            auth = f"{quote(client.userid or '')}:{quote(client.password or '')}@" if client.userid else ""
            urls = [f"etcdv3://{auth}{client.hostname or 'localhost'}:{client.port or Transport.default_port}"]
        return urls + [f"etcdv3://{endpoint}" for endpoint in options.get("endpoints", ())]

    def driver_version(self):
        return etcd3.__version__

    def establish_connection(self):
        self._space_reconnects()
        wait_connected(self.etcd, self.client.connect_timeout)  # connect_timeout bounds the first contact
        ops.get(self.etcd, self.keys.ping())  # raises a connection error if etcd is unreachable
        return super().establish_connection()

    def _space_reconnects(self) -> None:
        """Wait until RECONNECT_GAP_SECONDS have passed since this kombu connection last connected."""
        last = _connected_at.get(self.client)
        if last is not None:
            time.sleep(max(0.0, last + RECONNECT_GAP_SECONDS - time.monotonic()))
        _connected_at[self.client] = time.monotonic()

    def close_connection(self, connection):
        if inherited(self.owner_pid):
            self._forget_after_fork()
            return
        super().close_connection(connection)
        self.parking.withdraw_all(self.lease.requeue_later, self.lease.withdraw_later)
        self.delayed.close()
        self._close_pipe()
        self._unwatch_all()
        if self._bindings is not None:
            self._bindings.close()
            self._bindings = None

    def _forget_after_fork(self) -> None:
        """Closed in a forked child (kombu's after-fork ``Connection.collect``): forget everything.

        Its channels' messages, parks, queue watches and lease are the parent's, which still runs:
        giving any of it back would run tasks twice, and the parent's threads may hold its locks.
        Only the child's copies of the wake-up pipe's descriptors are closed (the parent's event loop
        keeps its own).
        """
        for channel in self._avail_channels + self.channels:
            channel._forget_after_fork()
        self._avail_channels, self.channels = [], []
        pipe, self._pipe, self._loop = self._pipe, None, None
        for fd in pipe or ():
            try:
                os.close(fd)
            except OSError:
                pass
        self._bindings, self._hub = None, None

    # -- shared state for channels -------------------------------------------------
    @property
    def lease(self) -> ConsumerLease:
        """The process's consumer lease for this etcd and key space (consumer.py's ``consumer_lease``: made on
        first use, made again in a forked child or once closed)."""
        lease = consumer_lease(self.etcd, self.keys, self.lease_ttl, self.reconcile_seconds)
        lease.hold_for(self)  # what this transport holds counts as held (consumer.py)
        return lease

    @property
    def watch_hub(self) -> WatchHub:
        """The process's one watch stream for our etcd (shared with the result backend).

        Kept once taken: unsubscribing must reach the stream that carries the watch.
        """
        if self._hub is None:
            self._hub = hub_for(self.config)
        return self._hub

    @property
    def parked(self) -> ParkedConsumers:
        """Which consumers wait on the queues we publish to (delivery.py; shared by the process)."""
        return parked_consumers(self.etcd, self.keys, self.watch_hub)

    def held_keys(self) -> set[str]:
        """Every unacked key this connection holds (consumer.py): its channels', hand-offs received
        and not taken, and messages kept across a reset for tasks still running (consumer.py)."""
        held = set(self.parking.held_keys()) | set(kept_keys())
        for channel in list(self.channels):
            held.update(channel.held_keys())
        return held

    def arriving(self, key: str) -> bool:
        """True if ``key`` is a hand-off to us whose watch event has not arrived yet (consumer.py)."""
        return self.parking.arriving(key)

    def give_back_handoffs_without_room(self) -> None:
        """Hand-offs that arrived after our prefetch room filled go back in line at once (delivery.py),
        where an idle consumer can take them, instead of waiting here for a slot."""
        for queue in self.parking.queues_with_handoffs():
            if not any(channel.has_room_for(queue) for channel in self.channels):
                for key in self.parking.give_back(queue):
                    logger.debug("hand-off %s on queue %r given back: no prefetch room", key, queue)
                    self.lease.requeue_later(key)

    def unwatch_queue(self, queue: str) -> None:
        """The last consumer of ``queue`` here is gone: withdraw our park, give back hand-offs not delivered."""
        if super().unwatch_queue(queue):
            self.delayed.unfollow(queue)
            self.parking.withdraw(queue, self.lease.requeue_later, self.lease.withdraw_later)

    @property
    def bindings(self) -> BindingTable:
        if self._bindings is None:
            self._bindings = BindingTable(self.etcd, self.keys, self.watch_hub)
        return self._bindings

    def remember_exchange(self, exchange: str, type: str) -> None:
        if self._exchange_types.get(exchange) != type:
            ops.run(self.etcd, ops.put(self.keys.exchange(exchange), type))
            self._exchange_types[exchange] = type

    def exchange_type(self, exchange: str) -> str | None:
        if exchange not in self._exchange_types:
            kv = ops.first_kv_of(ops.get(self.etcd, self.keys.exchange(exchange)))
            if kv is None:
                return None
            self._exchange_types[exchange] = kv.value.decode()
        return self._exchange_types[exchange]


def _too_large_or(exc: grpc.RpcError, queue: str, size: int, limit: int) -> Exception:
    if is_request_too_large(exc):
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return MessageTooLarge(
            f"etcd refused a {size}-byte message for queue {queue!r}: {details}; "
            f"the transport limit is {limit} bytes and the server's --max-request-bytes is lower")
    return exc


# -------------------- idempotent: Idempotent publish: a publish retried after an ambiguous failure is
#   stored once.
#
# A publish whose etcd call fails without an answer (deadline exceeded, connection lost after
# sending, a leader change) may have been committed. kombu's ``Connection.ensure`` (Celery's
# publish retry) then runs the publish again; without a guard the retry stores a second copy
# and the task runs twice.
#
# So a publish is named once, before its first attempt: :meth:`Channel.basic_publish` puts a
# publish id (a sequence number, ops.py) in the message's properties, the dict kombu hands to
# every retry of one ``Producer.publish``, and in its headers, the dict Celery hands to every
# retry of a worker's callback publish (``AMQP._retry_publish``: ``Producer.publish`` called again),
# and takes it out of both once the publish returned. The id is never stored with the message (a
# consumer that republishes a message's properties makes a new publish). Each attempt is one
# transaction that
#
# * compares ``p/<queue>/<id>`` (the publish marker) to absent, and
# * writes the message and the marker (empty, on a marker lease of MARKER_SECONDS or a little more).
#
# A retry whose first attempt committed finds the marker and writes nothing, whether the message
# still waits, was claimed, or was acked and deleted meanwhile. The message's own key is fixed by
# the id too (``ready/<band>/<id>``), so a large message's body chunks are overwritten, not copied.
#
# Cost: one compare and one put more in the same transaction (no extra request, no extra Raft
# proposal), one live key per message published in the last MARKER_SECONDS, and one lease grant
# and one lease expiry per MARKER_BUCKET_SECONDS per publishing process (the one lease pool,
# core/ops.py; a marker lease etcd no longer knows is forgotten and the write tried once more).
# A retry later than MARKER_SECONDS after the first attempt is not guarded (Celery's retry policy
# gives up long before). ``Producer.batch()`` writes one marker per transaction (publish_batch.py).

#: The message property (and header) that names one publish across its retries: "<id> <hash of the body>"
#: (removed before the message is stored).
PUBLISH_ID = "x-etcd-publish-id"
#: Least seconds a publish marker lives: a retry within this of the first attempt is stored once.
MARKER_SECONDS = 120
#: Markers written within this many seconds share one lease (a marker lives MARKER_SECONDS to MARKER_SECONDS
#: + this); its expiry deletes that many seconds of one process's markers in one etcd proposal.
MARKER_BUCKET_SECONDS = 10


def marker_lease(client: Any) -> int:
    """The lease for a marker written now: from the process's one lease pool (core/ops.py), shared by
    the markers of MARKER_BUCKET_SECONDS, ending MARKER_SECONDS to MARKER_SECONDS + that from now."""
    return ops.pool_for(client.config).lease_for(time.time() + MARKER_SECONDS, MARKER_BUCKET_SECONDS)


def forget_lease(client: Any, lease: int) -> None:
    """etcd no longer knows ``lease`` (LeaseNotFound): the next marker gets a new one."""
    ops.pool_for(client.config).forget(lease)


@dataclass(frozen=True)
class Guard:
    """The marker of one publish to one queue: what each attempt's transaction compares and writes."""

    key: str
    lease: int

    def compare(self) -> etcdrpc.Compare:
        """Holds while no attempt of this publish has been committed."""
        return ops.compare(self.key, "version", 0)

    def put(self) -> etcdrpc.RequestOp:
        return ops.put(self.key, b"", self.lease)


def publish_guard(client: Any, keys: KeySpace, queue: str, publish_id: str) -> Guard:
    """The guard of publish ``publish_id`` to ``queue`` (grants a marker lease at most every bucket)."""
    return Guard(keys.published(queue, publish_id), marker_lease(client))


def _places(message: dict) -> list[dict]:
    """Where a publish id survives a retry: the properties (kombu's ``ensure`` passes the same dict to
    each attempt) and the headers (Celery's callback retry calls ``Producer.publish`` again, with new
    properties but the same headers dict)."""
    return [place for place in (message.get("properties"), message.get("headers")) if isinstance(place, dict)]


def name_publish(message: dict, new_id: Callable[[], str]) -> str:
    """Give ``message`` its publish id: the one an earlier attempt of the same publish gave it, if any
    (same dicts and the same body: a caller that reuses a headers dict for another body gets a new id)."""
    places, body = _places(message), f" {hash(message.get('body'))}"
    found = next((place[PUBLISH_ID] for place in places if str(place.get(PUBLISH_ID, "")).endswith(body)), None)
    found = found or new_id() + body
    for place in places:
        place[PUBLISH_ID] = found
    return found.split(" ", 1)[0]


def published(message: dict) -> None:
    """The publish returned: its id goes (a later publish of the same dicts is a new publish)."""
    for place in _places(message):
        place.pop(PUBLISH_ID, None)


def publish_id_of(message: dict) -> str | None:
    """The id :func:`name_publish` gave this publish (None: an unguarded publish)."""
    value = (message.get("properties") or {}).get(PUBLISH_ID)
    return value.split(" ", 1)[0] if value else None


def stored_form(message: dict) -> dict:
    """``message`` as stored: without the publish id."""
    stored = message
    for field in ("properties", "headers"):
        place = message.get(field)
        if isinstance(place, dict) and PUBLISH_ID in place:
            stored = {**stored, field: {k: v for k, v in place.items() if k != PUBLISH_ID}}
    return stored


def note_retry(queue: str, marker: str) -> None:
    """A publish attempt found its own marker: an earlier attempt was committed; nothing written."""
    logger.info("publish to %r retried after an ambiguous failure was already stored (%s); not stored again",
                queue, marker)


# -------------------- queue_limits: Queue arguments on etcd, as RabbitMQ means them: message TTL, queue
#   expiry, length limits.
#
# * Message TTL (``expiration`` on publish, queue ``message_ttl`` / ``x-message-ttl``): the
#   ready key is attached to a lease that etcd revokes at (or just after) the deadline, and
#   the deadline is written in the key, so a consumer drops an expired message unread.
# * Queue ``expires`` / ``x-expires``: the declared key, and the messages without a TTL of
#   their own, hang on one lease that declaring, ``basic_get`` and consuming keep alive;
#   etcd deletes them all together when the queue goes unused.
# * ``max_length`` / ``x-max-length`` with ``x-overflow`` ``drop-head`` (default) or
#   ``reject-publish``: one transaction writes the message only if no other message arrived
#   since the count it decided on, dropping the head in the same transaction.


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
        """The process's lease pool (core/ops.py): message TTLs share one lease per second of deadlines."""
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

        ``guard`` (a :class:`Guard`, the idempotent section): written once; False if an earlier attempt of this publish stored it.
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
