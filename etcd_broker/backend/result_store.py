"""etcd operations behind the result backend: task states, chord counting.

Shared per process: one :class:`ResultStore` per (etcd configuration, prefix); leases come from
the process's pool (core/ops.py, buckets of a tenth of the TTL); watches go through the process's watch hub
(watch.py). This module speaks bytes and revisions; Celery's meta encoding stays in backend.py.
"""
from __future__ import annotations

import enum
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from etcd_broker.core import ops
from etcd_broker.core.client import COMPACTED, EtcdConfig, PerProcess, classify, get_client
from etcd_broker.core.ops import KeySpace
from etcd_broker.core.watch import WatchHub, close_hubs, hub_for
from etcd_broker.exceptions import WriteConflict

logger = logging.getLogger(__name__)

#: Reads of many keys are split into transactions this big (etcd's limit, core/ops.py).
MAX_TXN_OPS = ops.MAX_TXN_OPS
#: Task ids whose last write we remember (id -> mod revision), so the next write skips a read.
LAST_WRITE_MEMORY = 4096
#: Compare-and-put attempts on one key before giving up (only a concurrent writer forces a retry).
MAX_WRITE_ATTEMPTS = 32
#: Most earlier states read back for a waiter that asked for every state but started late.
MAX_EARLIER_STATES = 100
#: Lease of a chord's publisher claim (seconds): if its holder dies between claiming and
#: deleting the chord, a redelivered part may take over this long (plus one lease bucket) later.
CHORD_CLAIM_TTL = 10
SUCCESS = "SUCCESS"


class WriteOutcome(enum.Enum):
    WRITTEN = "written"
    KEPT_SUCCESS = "kept-success"  # a SUCCESS is stored already; like Celery, keep it
    CANCELLED = "cancelled"  # a cancel marker exists (checked for progress writes only)
    WRITTEN_ACKED = "written_acked"  # stored, and the task's message deleted in the same transaction


class ChordClaim(enum.Enum):
    CLAIMED = "claimed"  # this process publishes the callback
    HELD = "held"  # another process's claim is alive: it publishes (or its lease lapses)
    DONE = "done"  # the chord's keys are gone: its callback was published


@dataclass(frozen=True)
class Stored:
    """One stored value and the revisions that order it."""

    value: bytes
    mod_revision: int
    create_revision: int = 0

    @classmethod
    def from_kv(cls, kv: Any) -> Stored:
        return cls(kv.value, kv.mod_revision, kv.create_revision)


@dataclass(frozen=True)
class ChordCount:
    """What the transaction that recorded one chord part saw."""

    done: int
    size: int | None


def status_of(value: bytes) -> str | None:
    """The Celery state in a stored JSON value (None if it is not one)."""
    try:
        return json.loads(value).get("status")
    except (ValueError, AttributeError):
        return None


class ResultStore:
    """Task states, group results, chord counters and cancel markers under one key prefix."""

    def __init__(self, config: EtcdConfig, keys: KeySpace) -> None:
        self.config = config
        self.keys = keys
        self.client = get_client(config)
        self.leases = ops.pool_for(config)
        self._last_write: OrderedDict[str, int] = OrderedDict()
        self._memory_lock = threading.Lock()

    @property
    def hub(self) -> WatchHub:
        """This process's watch hub for our etcd cluster."""
        return hub_for(self.config)

    def current_revision(self) -> int:
        """etcd's current revision (one small read)."""
        return ops.get(self.client, self.keys.results(), count_only=True).header.revision

    # -- task states ------------------------------------------------------------
    def read(self, task_id: str) -> tuple[Stored | None, int]:
        """The stored state of ``task_id`` (or None) and the revision it was read at."""
        response = self._get(self.keys.result(task_id))
        stored = Stored.from_kv(response.kvs[0]) if response.kvs else None
        return stored, response.header.revision

    def read_many(self, task_ids: Iterable[str]) -> tuple[dict[str, Stored], int]:
        """Stored states of every id that has one, and a revision at or before every read.

        Read in as few transactions as etcd allows; resuming a watch after the returned
        revision misses nothing written since any of the reads.
        """
        ids = list(dict.fromkeys(task_ids))
        found: dict[str, Stored] = {}
        revision = 0
        for start in range(0, len(ids), MAX_TXN_OPS):
            chunk = ids[start:start + MAX_TXN_OPS]
            response = self._txn(success=[ops.range_(self.keys.result(task_id)) for task_id in chunk])
            revision = min(revision or response.header.revision, response.header.revision)
            for task_id, op in zip(chunk, response.responses, strict=True):
                stored = _stored(op)
                if stored is not None:
                    found[task_id] = stored
        return found, revision or self.current_revision()

    def earlier_states(self, task_id: str, stored: Stored) -> list[Stored]:
        """The states ``task_id`` had before ``stored`` (same run of the key), oldest first, as far
        back as etcd still keeps its history (compaction ends the walk; at most MAX_EARLIER_STATES)."""
        key = self.keys.result(task_id)
        found: list[Stored] = []
        revision = stored.mod_revision
        while len(found) < MAX_EARLIER_STATES and revision > stored.create_revision > 0:
            try:
                response = self._get(key, revision=revision - 1)
            except grpc.RpcError as exc:
                if classify(exc) == COMPACTED:
                    break
                raise
            kv = response.kvs[0] if response.kvs else None
            if kv is None or kv.create_revision != stored.create_revision:
                break
            found.append(Stored.from_kv(kv))
            revision = kv.mod_revision
        return found[::-1]

    def write_state(self, task_id: str, value: bytes, *, ttl: int | None, success: bool = False,
                    check_cancel: bool = False, ack_key: str | None = None) -> WriteOutcome:
        """Store ``value`` unless SUCCESS is stored already; one transaction when uncontended.

        ``success``: ``value`` is a SUCCESS, after which this process must read before writing.
        ``ack_key``: the task's unacked message, deleted in the same transaction (consumer.py).
        """
        key = self.keys.result(task_id)
        cancel_key = self.keys.cancel(task_id) if check_cancel else None
        expected = self._remembered(task_id)
        for _ in range(MAX_WRITE_ATTEMPTS):
            response = self._with_lease(ttl, self._put_if_unchanged, key, value, expected, cancel_key, ack_key)
            if response.succeeded:
                self._remember(task_id, 0 if success else response.header.revision)
                if ack_key is not None and response.responses[1].response_delete_range.deleted:
                    return WriteOutcome.WRITTEN_ACKED
                return WriteOutcome.WRITTEN
            current = _stored(response.responses[0])
            if cancel_key is not None and ops.count(response.responses[1]):
                return WriteOutcome.CANCELLED
            if current is not None and status_of(current.value) == SUCCESS:
                return WriteOutcome.KEPT_SUCCESS
            expected = current.mod_revision if current is not None else 0
        raise WriteConflict(f"result of task {task_id} changed {MAX_WRITE_ATTEMPTS} times while we wrote it")

    def write_successes(self, writes: Sequence[tuple[str, bytes, str | None]], *, ttl: int | None) -> list[WriteOutcome]:
        """``write_state(task_id, value, success=True, ack_key=...)`` for each ``(task_id, value,
        ack_key)``, sharing etcd transactions; one outcome per write, in order."""
        responses = self._with_lease(ttl, self._put_many, writes)
        outcomes = []
        for (task_id, value, ack_key), response in zip(writes, responses, strict=True):
            if not response.succeeded:  # a state stored meanwhile (or SUCCESS already): the careful path
                outcomes.append(self.write_state(task_id, value, ttl=ttl, success=True, ack_key=ack_key))
                continue
            self._remember(task_id, 0)
            acked = ack_key is not None and response.responses[1].response_delete_range.deleted
            outcomes.append(WriteOutcome.WRITTEN_ACKED if acked else WriteOutcome.WRITTEN)
        return outcomes

    def _put_many(self, writes: Sequence[tuple[str, bytes, str | None]], *, lease: int) -> list[Any]:
        transactions = [_put_if_unchanged_ops(self.keys.result(task_id), value, self._remembered(task_id), None,
                                              ack_key, lease) for task_id, value, ack_key in writes]
        return ops.shared(self.client).txn_many(transactions)

    def _put_if_unchanged(self, key: str, value: bytes, expected: int, cancel_key: str | None,
                          ack_key: str | None = None, *, lease: int) -> Any:
        transaction = _put_if_unchanged_ops(key, value, expected, cancel_key, ack_key, lease)
        return ops.shared(self.client).txn(*transaction)  # shared with concurrent writers

    def forget(self, task_id: str) -> None:
        """Delete the state and any cancel marker of ``task_id`` now."""
        self._txn(success=[ops.delete(self.keys.result(task_id)), ops.delete(self.keys.cancel(task_id))])
        with self._memory_lock:
            self._last_write.pop(task_id, None)

    def _remembered(self, task_id: str) -> int:
        with self._memory_lock:
            return self._last_write.get(task_id, 0)

    def _remember(self, task_id: str, revision: int) -> None:
        with self._memory_lock:
            if not revision:
                self._last_write.pop(task_id, None)
                return
            self._last_write[task_id] = revision
            self._last_write.move_to_end(task_id)
            while len(self._last_write) > LAST_WRITE_MEMORY:
                self._last_write.popitem(last=False)

    # -- plain keys (saved groups) --------------------------------------------------
    def get(self, key: str | bytes) -> bytes | None:
        response = self._get(key)
        return response.kvs[0].value if response.kvs else None

    def get_many(self, keys: Iterable[str | bytes]) -> list[bytes | None]:
        keys = list(keys)
        values: list[bytes | None] = []
        for start in range(0, len(keys), MAX_TXN_OPS):
            response = self._txn(success=[ops.range_(key) for key in keys[start:start + MAX_TXN_OPS]])
            values.extend(kv.value if kv else None for kv in map(ops.first_kv, response.responses))
        return values

    def put(self, key: str | bytes, value: bytes, ttl: int | None) -> None:
        self._with_lease(ttl, self._put, key, value)

    def _put(self, key: str | bytes, value: bytes, *, lease: int) -> Any:
        return self._txn(success=[ops.put(key, value, lease)])

    def delete(self, key: str | bytes) -> None:
        self._txn(success=[ops.delete(key)])

    # -- chords -------------------------------------------------------------------------
    def reset_chord(self, group_id: str) -> None:
        """Forget any earlier run of this chord (a frozen chord applied again reuses its id)."""
        self._txn(success=[ops.delete(self.keys.chord(group_id), prefix=True)])

    def set_chord_size(self, group_id: str, size: int, ttl: int | None) -> None:
        self.put(self.keys.chord_size(group_id), str(size).encode(), ttl)

    def grow_chord(self, group_id: str, ttl: int | None) -> None:
        """One more header task (``Task.add_to_chord``): add 1 to the size, compare-and-put."""
        key = self.keys.chord_size(group_id)
        for _ in range(MAX_WRITE_ATTEMPTS):
            kvs = self._get(key).kvs
            size = int(kvs[0].value) + 1 if kvs else 1
            expected = kvs[0].mod_revision if kvs else 0
            if self._txn(compare=[ops.compare(key, "mod_revision", expected)],
                         success=[ops.put(key, str(size).encode(), self.leases.lease_for_ttl(ttl))]).succeeded:
                return
        raise WriteConflict(f"chord {group_id} size changed {MAX_WRITE_ATTEMPTS} times while we grew it")

    def chord_part_done(self, group_id: str, part: str, ttl: int | None) -> ChordCount | None:
        """Record one finished header task; None if this part was counted before (a redelivery) or the
        chord is settled already (a part run again after the callback was published).

        One transaction creates the part's key only if it is absent and the chord's saved group
        exists (``apply_chord`` saves it before any part is sent; :meth:`delete_chord` deletes it with
        the chord's keys) and, in the same revision, counts the parts and reads the size: exactly one
        part sees done == size. Without the group check a part run again after the chord was settled
        left its key behind until the chord's expiry.
        """
        response = self._with_lease(ttl, self._count_part, group_id, part)
        if not response.succeeded:
            return None
        size = ops.first_kv(response.responses[2])
        return ChordCount(done=ops.count(response.responses[1]),
                          size=int(size.value) if size is not None else None)

    def _count_part(self, group_id: str, part: str, *, lease: int) -> Any:
        part_key = self.keys.chord_part(group_id, part)
        return self._txn(compare=[ops.compare(part_key, "version", 0),
                                  ops.compare(self.keys.group_result(group_id), "version", 0, ">")],
                         success=[ops.put(part_key, b"", lease),
                                  ops.range_(self.keys.chord_parts(group_id), count_only=True, prefix=True),
                                  ops.range_(self.keys.chord_size(group_id))])

    def chord_due(self, group_id: str) -> bool:
        """True while every part is counted and the chord's keys remain: its callback is not yet published."""
        response = self._txn(success=[ops.range_(self.keys.chord_parts(group_id), count_only=True, prefix=True),
                                      ops.range_(self.keys.chord_size(group_id))])
        size = ops.first_kv(response.responses[1])
        return size is not None and ops.count(response.responses[0]) >= int(size.value)

    def claim_chord(self, group_id: str, owner: str) -> ChordClaim:
        """Become the one publisher of the chord's callback, under a :data:`CHORD_CLAIM_TTL` lease.

        One transaction: the size key still exists (not published yet) and nobody holds the claim.
        """
        return self._with_lease(CHORD_CLAIM_TTL, self._claim_chord, group_id, owner)

    def _claim_chord(self, group_id: str, owner: str, *, lease: int) -> ChordClaim:
        size, claim = self.keys.chord_size(group_id), self.keys.chord_publisher(group_id)
        response = self._txn(compare=[ops.compare(size, "version", 0, ">"), ops.compare(claim, "version", 0)],
                             success=[ops.put(claim, owner, lease)],
                             failure=[ops.range_(size, count_only=True)])
        if response.succeeded:
            return ChordClaim.CLAIMED
        return ChordClaim.HELD if ops.count(response.responses[0]) else ChordClaim.DONE

    def delete_chord(self, group_id: str) -> None:
        """Settle the chord: its keys and its saved group go in one transaction (a late part then counts nothing)."""
        self._txn(success=[ops.delete(self.keys.chord(group_id), prefix=True),
                           ops.delete(self.keys.group_result(group_id))])

    # -- cooperative cancel ----------------------------------------------------------
    def request_cancel(self, task_id: str, ttl: int | None) -> None:
        self.put(self.keys.cancel(task_id), b"1", ttl)

    def is_cancelled(self, task_id: str) -> bool:
        return self._get(self.keys.cancel(task_id), count_only=True).count > 0

    def cancelled_among(self, task_ids: Sequence[str]) -> set[str]:
        """The ids among ``task_ids`` with a cancel marker, read in as few transactions as etcd allows."""
        cancelled: set[str] = set()
        for start in range(0, len(task_ids), MAX_TXN_OPS):
            chunk = task_ids[start:start + MAX_TXN_OPS]
            response = self._txn(success=[ops.range_(self.keys.cancel(task_id), count_only=True) for task_id in chunk])
            cancelled.update(task_id for task_id, op in zip(chunk, response.responses, strict=True) if ops.count(op))
        return cancelled

    # -- plumbing -------------------------------------------------------------------------
    def _with_lease(self, ttl: int | None, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args, lease=...)`` with the bucket's lease; a lease etcd lost is replaced once."""
        lease = self.leases.lease_for_ttl(ttl)
        try:
            return call(*args, lease=lease)
        except ops.LeaseNotFound:
            logger.info("result lease %x is gone; granting a new one", lease)
            self.leases.forget(lease)
            return call(*args, lease=self.leases.lease_for_ttl(ttl))

    def _txn(self, **parts: Any) -> Any:
        return ops.txn(self.client, **parts)

    def _get(self, key: str | bytes, **options: Any) -> Any:
        return ops.get(self.client, key, **options)


def _put_if_unchanged_ops(key: str, value: bytes, expected: int, cancel_key: str | None, ack_key: str | None,
                          lease: int) -> tuple[list, list, list]:
    """(compare, success, failure) of one state write: put ``value`` if the key's mod_revision is still
    ``expected`` (and no cancel marker, when ``cancel_key``), deleting ``ack_key`` with it; on failure read
    the key (and count the marker)."""
    compare = [ops.compare(key, "mod_revision", expected)]
    failure = [ops.range_(key)]
    if cancel_key is not None:
        compare.append(ops.compare(cancel_key, "version", 0))
        failure.append(ops.range_(cancel_key, count_only=True))
    success = [ops.put(key, value, lease)] + ([ops.delete(ack_key)] if ack_key is not None else [])
    return compare, success, failure


def _stored(response_op: Any) -> Stored | None:
    kv = ops.first_kv(response_op)
    return Stored.from_kv(kv) if kv is not None else None


_stores = PerProcess()


def store_for(config: EtcdConfig, prefix: str) -> ResultStore:
    """The shared :class:`ResultStore` for ``config`` and key ``prefix`` in this process."""
    return _stores.get((config, prefix), lambda: ResultStore(config, KeySpace(prefix)))


def close_shared() -> None:
    """Close this process's watch hubs and forget stores and lease pools (tests, shutdown)."""
    _stores.clear()
    ops.forget_pools()
    close_hubs()
