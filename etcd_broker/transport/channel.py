"""etcd v3 transport for kombu (and so for Celery).

Features
========
* Type: Virtual
* Supports Direct: Yes
* Supports Topic: Yes
* Supports Fanout: Yes (bindings live in etcd, so broadcast reaches other hosts)
* Supports Priority: Yes, 0-9, 9 the most urgent (AMQP's meaning)
* Supports TTL: Yes (message `expiration`, queue `x-message-ttl` and `x-expires`, on etcd leases;
  `x-max-length` with drop-head or reject-publish; see queue_limits.py)

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
  holds, and how long such a message stays unheld first (default 30; reconcile.py).
* ``delayed_delivery``: Celery tasks due later (``countdown``, ``eta``) wait in etcd until due,
  not in a worker's memory (default True; delayed.py).
* ``default_priority``: priority 0-9 of a message sent with ``priority=None`` (default 0).
* ``idempotent_publish``: a publish retried after an ambiguous failure (kombu's ``ensure``) is
  stored once: each publish writes a short-lived marker in its transaction (default True; idempotent.py).
* ``endpoints``: extra endpoints, ``["h2:2379", ...]``, besides the URL's.
* ``user``, ``password``, ``ca_cert``, ``cert_key``, ``cert_cert``, ``timeout``: see client.py.
"""
from __future__ import annotations

import json
import logging
import os
import time
import weakref
from collections import deque
from queue import Empty
from urllib.parse import quote

import etcd3
import grpc
from kombu.transport import virtual
from kombu.transport.base import to_rabbitmq_queue_arguments
from kombu.utils.json import dumps

from etcd_broker.core import forking, group_commit, ops
from etcd_broker.core.client import (
    CONNECTION_ERRORS,
    ETCD_OPTIONS,
    EtcdConfig,
    EtcdUnreachable,
    get_client,
    is_request_too_large,
    wait_connected,
)
from etcd_broker.core.keys import DEFAULT_PREFIX, KeySpace, Sequence, range_end
from etcd_broker.core.watch import WatchHub, hub_for
from etcd_broker.exceptions import MessageTooLarge
from etcd_broker.transport import delayed, executing, handoff, idempotent, large_body, settle
from etcd_broker.transport.bindings import BindingTable
from etcd_broker.transport.event_loop import EventLoopMixin
from etcd_broker.transport.expired import revoke_expired
from etcd_broker.transport.membership import DEFAULT_LEASE_TTL, ConsumerLease, consumer_lease, restore_message
from etcd_broker.transport.options import check_options
from etcd_broker.transport.publish_batch import PublishBatch
from etcd_broker.transport.qos import QoS
from etcd_broker.transport.queue_limits import QueueLimits, QueueRegistry, check_queue_name, message_deadline
from etcd_broker.transport.queue_watch import CLAIM_BATCH, QueueWatchMixin
from etcd_broker.transport.reconcile import RECONCILE_SECONDS

logger = logging.getLogger(__name__)

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
#: The first window of a head read from a queue's cursor, in sequence units (ns of publish time, keys.py):
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
    #: A publish retried after an ambiguous failure is stored once (a marker per publish: idempotent.py).
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
        """Publish, named once across kombu's retries of it (idempotent.py): a retry after an
        ambiguous failure finds the first attempt's marker and stores nothing again."""
        if self.idempotent_publish:
            idempotent.name_publish(message, self.connection.sequence.next)
        result = super().basic_publish(message, exchange, routing_key, **kwargs)
        idempotent.published(message)
        return result

    def _put(self, queue, message, **kwargs):
        check_queue_name(queue)
        priority = self._get_message_priority(message)
        limits, queue_lease = self.connection.queues.limits(queue)
        now = time.time()
        deadline = message_deadline(message, limits, now)
        due = delayed.due_time(message, now) if self.delayed_delivery else None
        if deadline is not None and (deadline <= now or (due is not None and deadline <= due)):
            revoke_expired(message)  # expired already, or before it is due: dropped, as a claim would drop it
            return
        publish_id = idempotent.publish_id(message)
        seq = publish_id or self.connection.sequence.next()
        value, chunks = dumps(idempotent.stored_form(message)).encode(), []
        if len(value) > self.max_message_bytes and deadline is not None:  # its body beside it (large_body.py)
            value, chunks = large_body.split(idempotent.stored_form(message), self.keys, queue, seq)
        self._check_size(queue, value)
        position = self.keys.position(priority, seq, deadline)
        key = self.keys.ready_message(queue, position)
        batch = kwargs.get("_publish_batch")
        for attempt in range(2):
            guard = idempotent.guard(self.client, self.keys, queue, publish_id) if publish_id is not None else None
            try:
                stored = self._write(queue, position, key, value, chunks, deadline, due, limits, queue_lease, batch,
                                     guard)
                break
            except ops.LeaseNotFound:
                if guard is None or attempt:
                    raise
                idempotent.forget_lease(self.client, guard.lease)  # refused, so not written: again, new lease
            except grpc.RpcError as exc:
                raise _too_large_or(exc, queue, len(value), self.max_message_bytes) from None
        if not stored:
            idempotent.note_retry(queue, guard.key)

    def _write(self, queue, position: str, key: str, value: bytes, chunks: list, deadline: float | None,
               due: float | None, limits, queue_lease: int, batch: PublishBatch | None,
               guard: idempotent.Guard | None) -> bool:
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

    def _put_plain(self, queue, position: str, key: str, value: bytes, guard: idempotent.Guard | None) -> bool:
        """The common case: one put, straight to an idle consumer if one is parked (handoff.py); concurrent
        publishers share a transaction. False: ``guard``'s marker says an earlier attempt stored it."""
        park = self.connection.parked.pick(queue) if len(value) <= handoff.HANDOFF_MAX_BYTES else None
        if park is not None:
            compare, success, failure = handoff.handoff_ops(self.keys, queue, position, value, key, park)
            if guard is not None:  # the hand-off's own compare decides between its branches, inside
                compare, success, failure = [guard.compare()], [guard.put(), ops.nested_txn(
                    compare, success, failure)], []
        else:
            compare, success, failure = [], [ops.put(key, value)], []
            if guard is not None:
                compare, success = [guard.compare()], [*success, guard.put()]
        return group_commit.shared(self.client).txn(compare, success, failure).succeeded or guard is None

    def _put_fanout(self, exchange, message, routing_key, **kwargs):
        for queue in {queue for _, _, queue in self.get_table(exchange)}:
            self._put(queue, message, **kwargs)

    def create_publish_batch(self, max_size: int) -> PublishBatch:
        """kombu's ``Producer.batch()``: puts buffered and written a transaction at a time."""
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
        """Idle on an empty queue inside an event loop: let publishers hand us its next message (handoff.py)."""
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

        Read from the queue's cursor (queue_watch.py), first through windows of publish time
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
            message = large_body.join(self.client, json.loads(value), discard=unacked is None)
            message["properties"]["delivery_info"]["etcd_key"] = unacked
        except CONNECTION_ERRORS:
            if unacked:  # claimed but not delivered: back in line once etcd answers
                self.lease.requeue_later(unacked)
            return None
        except (ValueError, KeyError, TypeError) as exc:  # large_body.BodyMissing too
            self._dead_letter(queue, unacked, value, exc)
            return None
        task_id = (message.get("headers") or {}).get("id")
        if unacked and isinstance(task_id, str):  # its SUCCESS write may delete it (settle.py)
            settle.hold(task_id, unacked, self.client, self.lease.current_key)
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
        if self.connection is not None and forking.inherited(self.connection.owner_pid):
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
        if key and not settle.release(message.headers.get("id"), key):  # else deleted with its SUCCESS
            self.lease.delete_later(key)

    def _restore(self, message) -> None:
        """kombu's hook for a requeue (``reject(requeue=True)``, ``restore_unacked`` at close).

        At close (a connection reset), a message whose task is running in this process stays
        under our lease: the task acks it when it ends (executing.py). Given back, it would run twice.
        """
        if self.closed and executing.executing(message.headers.get("id")):
            executing.keep(self, message, self._requeue_later, self._forget)
            logger.info("channel closed while task %s runs here: its message %s stays ours until it acks",
                        message.headers.get("id"), message.delivery_info.get("etcd_key"))
            return
        settle.release(message.headers.get("id"), message.delivery_info.get("etcd_key"))
        self._requeue_or_later(message)

    def _requeue_later(self, message) -> None:
        """Give back through the lease's sweeper thread (never blocks the caller on etcd)."""
        key = message.delivery_info.get("etcd_key")
        settle.release(message.headers.get("id"), key)
        if key:
            self.lease.requeue_later(key)

    def _requeue_or_later(self, message) -> None:
        """Requeue now; if etcd is unreachable, the lease's sweeper does it once etcd answers.

        Known unreachable, or a stopping worker: no call is tried; the lease's sweeper gives it
        back, and if the process exits first the message stays under our lease and comes back
        when the lease is revoked or expires.
        """
        if executing.worker_stopping():
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
                if not executing.worker_stopping() and self.lease.reachable():
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

    Delivery through kombu's event loop or ``drain_events`` is event_loop.py's; the queue
    watches and what they tell about queue contents are queue_watch.py's.
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
        self.owner_pid = os.getpid()  # the process it belongs to (forking.inherited)
        self.keys = KeySpace(options.get("prefix", DEFAULT_PREFIX), client.virtual_host)
        self.lease_ttl = options.get("lease_ttl", DEFAULT_LEASE_TTL)
        self.reconcile_seconds = options.get("reconcile_seconds", RECONCILE_SECONDS)
        self.sequence = Sequence()
        self.declared: set[str] = set()
        self.queues = QueueRegistry(self.etcd, self.keys)  # queue arguments, TTL leases (queue_limits.py)
        self._exchange_types: dict[str, str] = {}
        self._bindings: BindingTable | None = None
        self._hub: WatchHub | None = None
        self.delayed = delayed.DelayedMover(self.etcd, self.keys, lambda: self.watch_hub)
        self.parking = handoff.Parking(self.etcd, self.keys, lambda: self.watch_hub, self.wake, self.config.timeout)
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
        if forking.inherited(self.owner_pid):
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
        """The process's consumer lease for this etcd and key space (membership.consumer_lease: made on
        first use, made again in a forked child or once closed)."""
        lease = consumer_lease(self.etcd, self.keys, self.lease_ttl, self.reconcile_seconds)
        lease.hold_for(self)  # what this transport holds counts as held (reconcile.py)
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
    def parked(self) -> handoff.ParkedConsumers:
        """Which consumers wait on the queues we publish to (handoff.py; shared by the process)."""
        return handoff.parked_consumers(self.etcd, self.keys, self.watch_hub)

    def held_keys(self) -> set[str]:
        """Every unacked key this connection holds (reconcile.py): its channels', hand-offs received
        and not taken, and messages kept across a reset for tasks still running (executing.py)."""
        held = set(self.parking.held_keys()) | set(executing.kept_keys())
        for channel in list(self.channels):
            held.update(channel.held_keys())
        return held

    def arriving(self, key: str) -> bool:
        """True if ``key`` is a hand-off to us whose watch event has not arrived yet (reconcile.py)."""
        return self.parking.arriving(key)

    def give_back_handoffs_without_room(self) -> None:
        """Hand-offs that arrived after our prefetch room filled go back in line at once (handoff.py),
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
