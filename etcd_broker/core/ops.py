"""etcd's keys and the one way to read and write them: keys, transactions, group commit, leases.

Every module that touches etcd builds its keys with :class:`KeySpace` and sends its requests
through the functions here (or :meth:`EtcdClient.call`); nothing else calls python3-etcd3's KV or
lease API. Sections:

- *keys*: :class:`KeySpace` (every key of queues, bindings, consumers, results), priority bands,
  :class:`Sequence`, ``range_end``.
- *ops*: build and run a transaction (``compare``/``put``/``delete``/``range_``, ``txn``), reads
  (``get``, ``pages``, ``scan``), leases (``grant``, ``keep_alive``, ``revoke``), etcd's transaction
  limits (``MAX_TXN_OPS``, ``MAX_TXN_BYTES``).
- *group_commit*: concurrent threads' transactions sent as one (``shared(client).txn``).
- *leases*: the one lease pool: keys that expire together share a lease (``pool_for(config)``).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any
from urllib.parse import quote, unquote

import grpc
from etcd3 import etcdrpc
from etcd3.utils import prefix_range_end, to_bytes

from etcd_broker.core.client import (
    CONNECTION_ERRORS,
    EtcdConfig,
    PerProcess,
    get_client,
    is_lease_not_found,
    is_reply_too_large,
)

# -------------------- keys: Every etcd key the transport and the result backend use, built in one place.
#
# Layout (``<root>`` is ``<prefix>/<vhost>``, names are percent-quoted so a ``/``
# in a queue name cannot escape its directory)::
#
#     <root>/declared/<queue>                         queue exists (JSON: auto_delete, owner lease)
#     <root>/q/<queue>/ready/<band>/<seq>[~<ms>]      waiting message; band = 9 - priority;
#                                                     ~<ms>: expires at this epoch millisecond (TTL)
#     <root>/q/<queue>/unacked/<lease>/<band>/<seq>   claimed by the consumer holding <lease>
#     <root>/q/<queue>/body/<seq>/<n>                 chunk n of a large expiring message's body
#     <root>/q/<queue>/parked/<token>                 an idle consumer waits for a hand-off (its lease;
#                                                     transport/delivery.py)
#     <root>/q/<queue>/delayed/<due>/<band>/<seq>[~<ms>]  an ETA task waiting for its due time
#                                                     (<due>: epoch ms, 13 digits; delayed.py)
#     <root>/p/<queue>/<publish id>                   a publish was stored (short lease; channel.py)
#     <root>/x/<exchange>                             exchange type
#     <root>/b/<exchange>/<queue>/<routing key>       binding (JSON: routing_key, pattern, queue)
#     <root>/consumer/<lease>                         live consumer (attached to its lease)
#     <root>/dead/<queue>/<seq>                       undecodable messages
#     <root>/ping, <root>/compaction-probe            never written: read or watched as probes
#     <prefix>/results/<task id>                      task state (result backend)
#     <prefix>/groups/<group id>                      saved GroupResult (result backend)
#     <prefix>/chords/<group id>/size                 chord header size (result backend)
#     <prefix>/chords/<group id>/parts/<task>.<index> one key per finished header task
#     <prefix>/chords/<group id>/publisher            who publishes the callback (short lease)
#     <prefix>/cancel/<task id>                       cooperative cancel marker
#
# ``<band>/<seq>`` sorts by urgency then age, so one ascending range read returns
# the next message; a claimed message keeps its ``<band>/<seq>`` and goes back to
# the same place in line when its consumer dies. A message with a TTL carries its
# deadline in its key, so a consumer can drop it unread and a requeue keeps it.

DEFAULT_PREFIX = "/deephardway"
#: Priorities as AMQP means them: 9 is the most urgent.
MAX_PRIORITY = 9
#: Separates a message's sequence number from its expiry deadline in its key.
DEADLINE_MARK = "~"


def _q(name: str) -> str:
    return quote(name, safe="") or "%00"


def range_end(prefix: str) -> str:
    """etcd's range end for every key that starts with ``prefix`` (prefix ends in '/')."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class Sequence:
    """Strictly increasing, zero-padded sequence numbers: wall-clock ns, unique per process."""

    def __init__(self) -> None:
        self._last = 0
        self._lock = threading.Lock()
        self._suffix = f"{os.getpid() & 0xFFFF:04x}{id(self) & 0xFFFF:04x}"

    def next(self) -> str:
        with self._lock:
            now = max(time.time_ns(), self._last + 1)
            self._last = now
        return f"{now:020d}-{self._suffix}"


class KeySpace:
    """Key builder for one prefix and virtual host."""

    def __init__(self, prefix: str = DEFAULT_PREFIX, vhost: str = "/") -> None:
        self.prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
        vhost = (vhost or "/").strip("/") or "default"
        self.root = f"{self.prefix}/{_q(vhost)}"

    # queues ---------------------------------------------------------------
    def queue(self, queue: str) -> str:
        return f"{self.root}/q/{_q(queue)}/"

    def declared_queues(self) -> str:
        return f"{self.root}/declared/"

    def declared(self, queue: str) -> str:
        return f"{self.declared_queues()}{_q(queue)}"

    def queue_of_declared(self, key: str | bytes) -> str:
        key = key.decode() if isinstance(key, bytes) else key
        return unquote(key[len(self.declared_queues()):])

    def ready(self, queue: str) -> str:
        return f"{self.queue(queue)}ready/"

    def ready_band(self, queue: str, band: int) -> str:
        return f"{self.ready(queue)}{band}/"

    def ready_message(self, queue: str, position: str) -> str:
        """``position`` is ``<band>/<seq>``."""
        return f"{self.ready(queue)}{position}"

    def unacked(self, queue: str, lease: int | None = None) -> str:
        base = f"{self.queue(queue)}unacked/"
        return base if lease is None else f"{base}{lease:016x}/"

    def unacked_message(self, queue: str, lease: int, position: str) -> str:
        return f"{self.unacked(queue, lease)}{position}"

    def delayed(self, queue: str) -> str:
        return f"{self.queue(queue)}delayed/"

    def delayed_until(self, queue: str, due: float) -> str:
        """The range end of the delayed messages of ``queue`` due at or before epoch second ``due``."""
        return f"{self.delayed(queue)}{int(due * 1000) + 1:013d}"

    def delayed_message(self, queue: str, due: float, position: str) -> str:
        """``position`` is ``<band>/<seq>[~<ms>]``: it moves to ``ready/<position>`` when due."""
        return f"{self.delayed(queue)}{max(0, int(due * 1000)):013d}/{position}"

    @staticmethod
    def due_of(key: str | bytes) -> float:
        """The epoch second a delayed message key is due at."""
        key = key.decode() if isinstance(key, bytes) else key
        return int(key.rsplit("/", 3)[-3]) / 1000

    def body_chunks(self, queue: str, seq: str) -> str:
        """The chunks of one large message's body (large_body.py), under the message's TTL lease."""
        return f"{self.queue(queue)}body/{seq}/"

    def body_chunk(self, queue: str, seq: str, index: int) -> str:
        return f"{self.body_chunks(queue, seq)}{index:06d}"

    def parked(self, queue: str) -> str:
        """The consumers parked on ``queue``, waiting for a publisher's hand-off (transport/delivery.py)."""
        return f"{self.queue(queue)}parked/"

    def parked_consumer(self, queue: str, token: str) -> str:
        """One consumer's parked key on ``queue`` (``token``: the parking transport's, fixed for its life)."""
        return f"{self.parked(queue)}{token}"

    def published(self, queue: str, publish_id: str) -> str:
        """The marker of one stored publish to ``queue`` (transport/channel.py)."""
        return f"{self.root}/p/{_q(queue)}/{publish_id}"

    @staticmethod
    def band(priority: int) -> int:
        return MAX_PRIORITY - priority

    def position(self, priority: int, seq: str, deadline: float | None = None) -> str:
        """``<band>/<seq>``, plus ``~<epoch ms>`` when the message expires at ``deadline``."""
        mark = "" if deadline is None else f"{DEADLINE_MARK}{max(0, int(deadline * 1000)):013d}"
        return f"{self.band(priority)}/{seq}{mark}"

    @staticmethod
    def deadline_of(key: str | bytes) -> float | None:
        """The epoch second a message key says it expires at (None: no TTL)."""
        key = key.decode() if isinstance(key, bytes) else key
        _, mark, millis = key.rpartition("/")[2].partition(DEADLINE_MARK)
        return int(millis) / 1000 if mark else None

    @staticmethod
    def window_end(key: bytes, width: int) -> bytes:
        """The key ``width`` sequence units (ns of publish time) past ready key ``key``, in its band.

        A bounded head read is ``[key, window_end(key, width))``: the messages of that band
        published within ``width`` ns after ``key``'s (transport.py; sequences are wall-clock ns).
        """
        band, _, name = key.rpartition(b"/")
        return b"%s/%020d" % (band, int(name[:20]) + width)

    def position_of(self, key: str | bytes) -> str:
        """The trailing ``<band>/<seq>`` of a ready or unacked message key."""
        key = key.decode() if isinstance(key, bytes) else key
        return "/".join(key.rsplit("/", 2)[-2:])

    def queue_of(self, key: str | bytes) -> str:
        """The queue name in a ready or unacked message key."""
        key = key.decode() if isinstance(key, bytes) else key
        return unquote(key[len(f"{self.root}/q/"):].split("/", 1)[0])

    def lease_of_unacked(self, key: str | bytes) -> int:
        key = key.decode() if isinstance(key, bytes) else key
        return int(key.split("/unacked/", 1)[1].split("/", 1)[0], 16)

    # exchanges and bindings ---------------------------------------------------
    def exchange(self, exchange: str) -> str:
        return f"{self.root}/x/{_q(exchange)}"

    def bindings(self, exchange: str) -> str:
        return f"{self.root}/b/{_q(exchange)}/"

    def binding(self, exchange: str, queue: str, routing_key: str) -> str:
        return f"{self.bindings(exchange)}{_q(queue)}/{_q(routing_key)}"

    def all_bindings(self) -> str:
        return f"{self.root}/b/"

    def exchange_of_binding(self, key: str | bytes) -> str:
        key = key.decode() if isinstance(key, bytes) else key
        return unquote(key[len(self.all_bindings()):].split("/", 1)[0])

    # consumers and dead letters ------------------------------------------------
    def consumers(self) -> str:
        return f"{self.root}/consumer/"

    def consumer(self, lease: int) -> str:
        return f"{self.consumers()}{lease:016x}"

    @staticmethod
    def lease_of_consumer(key: str | bytes) -> int:
        """The lease id of a ``consumer/<lease hex>`` key."""
        key = key.decode() if isinstance(key, bytes) else key
        return int(key.rsplit("/", 1)[1], 16)

    def dead(self, queue: str) -> str:
        return f"{self.root}/dead/{_q(queue)}/"

    def dead_message(self, queue: str, seq: str) -> str:
        """Where an undecodable message of ``queue`` is moved (its own sequence number)."""
        return f"{self.dead(queue)}{seq}"

    # probes ----------------------------------------------------------------------
    def ping(self) -> str:
        """A key never written: reading it proves etcd answers (Transport.establish_connection)."""
        return f"{self.root}/ping"

    def compaction_probe(self) -> str:
        """A key never written, under the deployment's prefix (a user's role may be limited to it):
        core/maintenance.py watches it from revision 1 to learn the last compaction."""
        return f"{self.root}/compaction-probe"

    # results -------------------------------------------------------------------
    def results(self) -> str:
        return f"{self.prefix}/results/"

    def result(self, task_id: str) -> str:
        return f"{self.results()}{_q(task_id)}"

    def task_id_of_result(self, key: str | bytes) -> str:
        key = key.decode() if isinstance(key, bytes) else key
        return unquote(key[len(self.results()):])

    def group_result(self, group_id: str) -> str:
        return f"{self.prefix}/groups/{_q(group_id)}"

    def chord(self, group_id: str) -> str:
        """Everything one chord counts with (deleted in one range delete when it completes)."""
        return f"{self.prefix}/chords/{_q(group_id)}/"

    def chord_size(self, group_id: str) -> str:
        return f"{self.chord(group_id)}size"

    def chord_parts(self, group_id: str) -> str:
        return f"{self.chord(group_id)}parts/"

    def chord_part(self, group_id: str, part: str) -> str:
        return f"{self.chord_parts(group_id)}{_q(part)}"

    def chord_publisher(self, group_id: str) -> str:
        return f"{self.chord(group_id)}publisher"

    def cancel(self, task_id: str) -> str:
        return f"{self.prefix}/cancel/{_q(task_id)}"


# -------------------- ops: etcd transactions: the one way this library builds and runs one.
#
# Builders return ``etcd3.etcdrpc`` protobufs (``Compare`` and ``RequestOp``); :func:`txn`
# runs them in one round trip and returns etcd's raw ``TxnResponse``, whose
# ``header.revision`` is the revision the transaction ran at. :func:`get` is the same
# for a lone range read. gRPC errors come back as our connection errors
# (``etcd_broker.core.client.CONNECTION_ERRORS``) or :class:`LeaseNotFound`.
#
# Example::
#
#     from etcd_broker.core import ops
#     response = ops.txn(client,
#                        compare=[ops.compare(key, "mod_revision", 0)],
#                        success=[ops.put(key, b"value", lease=lease_id)],
#                        failure=[ops.range_(key)])
#     if not response.succeeded:
#         current = ops.first_kv(response.responses[0])

logger = logging.getLogger(__name__)

#: Compare targets by name: the value compared is the key's mod_revision, version, value...
TARGETS = {
    "mod_revision": etcdrpc.Compare.MOD,
    "create_revision": etcdrpc.Compare.CREATE,
    "version": etcdrpc.Compare.VERSION,
    "value": etcdrpc.Compare.VALUE,
    "lease": etcdrpc.Compare.LEASE,
}
EQUAL = etcdrpc.Compare.EQUAL
NOT_EQUAL = etcdrpc.Compare.NOT_EQUAL
GREATER = etcdrpc.Compare.GREATER
LESS = etcdrpc.Compare.LESS
#: Readable spellings of the compare results (``compare(key, "version", 0, ">")``).
RESULTS = {"==": EQUAL, "!=": NOT_EQUAL, ">": GREATER, "<": LESS,
           EQUAL: EQUAL, NOT_EQUAL: NOT_EQUAL, GREATER: GREATER, LESS: LESS}

#: etcd's default --max-txn-ops: operations per transaction (compares and success ops counted apart).
MAX_TXN_OPS = 128
#: Bytes of keys and values per transaction we build, well under etcd's 1.5 MiB request limit.
MAX_TXN_BYTES = 1_048_576

Key = str | bytes
#: Keys per page of a read over a set that grows with the work (a queue, ``unacked/``, results):
#: a reply stays far under gRPC's receive limit with keys only; with values a page halves until it fits.
PAGE_KEYS = 1000
#: The KV method that runs each kind of op on its own (:func:`run`), by the op's field name.
_LONE_METHODS = {"request_put": "Put", "request_delete_range": "DeleteRange", "request_range": "Range"}


class LeaseNotFound(Exception):
    """A put named a lease etcd no longer knows (it expired, or etcd lost it): gRPC NOT_FOUND."""


# -- builders -------------------------------------------------------------------------
def compare(key: Key, target: str, value: int | bytes | str, result: str | int = EQUAL) -> etcdrpc.Compare:
    """``key``'s ``target`` (mod_revision, create_revision, version, value, lease) ``result`` ``value``.

    A missing key has version, mod_revision and create_revision 0: ``compare(key, "version", 0)``
    means "absent".
    """
    if target not in TARGETS:
        raise ValueError(f"compare target must be one of {sorted(TARGETS)} (got {target!r})")
    if result not in RESULTS:
        raise ValueError(f"compare result must be one of '==', '!=', '>', '<' (got {result!r})")
    if target == "value":
        value = to_bytes(value)
    return etcdrpc.Compare(key=to_bytes(key), target=TARGETS[target], result=RESULTS[result], **{target: value})


def put(key: Key, value: bytes | str, lease: int = 0, *, prev_kv: bool = False) -> etcdrpc.RequestOp:
    """Put ``value`` at ``key``, attached to ``lease`` (0: no lease)."""
    return etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(
        key=to_bytes(key), value=to_bytes(value), lease=lease, prev_kv=prev_kv))


def delete(key: Key, *, prefix: bool = False, prev_kv: bool = False) -> etcdrpc.RequestOp:
    """Delete ``key`` (or every key starting with it, with ``prefix=True``)."""
    key = to_bytes(key)
    request = etcdrpc.DeleteRangeRequest(key=key, prev_kv=prev_kv)
    if prefix:
        request.range_end = prefix_range_end(key)
    return etcdrpc.RequestOp(request_delete_range=request)


def range_request(key: Key, *, prefix: bool = False, range_end: Key | None = None, count_only: bool = False,
                  keys_only: bool = False, limit: int = 0, revision: int = 0) -> etcdrpc.RangeRequest:
    """A read of ``key``, of every key under it (``prefix``), or of [key, range_end)."""
    if prefix and range_end is not None:
        raise ValueError("give prefix=True or range_end, not both")
    if limit < 0:
        raise ValueError(f"limit must be >= 0 (0: no limit), got {limit}")
    key = to_bytes(key)
    request = etcdrpc.RangeRequest(key=key, count_only=count_only, keys_only=keys_only, limit=limit,
                                   revision=revision)
    if prefix:
        request.range_end = prefix_range_end(key)
    elif range_end is not None:
        request.range_end = to_bytes(range_end)
    return request


def range_(key: Key, **options: Any) -> etcdrpc.RequestOp:
    """A range read inside a transaction; options as :func:`range_request`."""
    return etcdrpc.RequestOp(request_range=range_request(key, **options))


# -- reading responses ------------------------------------------------------------------
def first_kv(response_op: etcdrpc.ResponseOp) -> Any | None:
    """The first key-value of a range op's response (None: no such key)."""
    kvs = response_op.response_range.kvs
    return kvs[0] if kvs else None


def first_kv_of(response: etcdrpc.RangeResponse) -> Any | None:
    """The first key-value of a lone range read (:func:`get`); None: no such key."""
    return response.kvs[0] if response.kvs else None


def count(response_op: etcdrpc.ResponseOp) -> int:
    """How many keys a (count_only) range op matched."""
    return response_op.response_range.count


def txn_request(compare: Iterable[etcdrpc.Compare] = (), success: Iterable[etcdrpc.RequestOp] = (),
                failure: Iterable[etcdrpc.RequestOp] = ()) -> etcdrpc.TxnRequest:
    """A transaction: if every ``compare`` holds, ``success``, else ``failure``."""
    return etcdrpc.TxnRequest(compare=list(compare), success=list(success), failure=list(failure))


def nested_txn(compare: Iterable[etcdrpc.Compare], success: Iterable[etcdrpc.RequestOp],
               failure: Iterable[etcdrpc.RequestOp]) -> etcdrpc.RequestOp:
    """A transaction run as one op of another one (etcd >= 3.3)."""
    return etcdrpc.RequestOp(request_txn=txn_request(compare, success, failure))


# -- running them -----------------------------------------------------------------------
def txn(client: Any, compare: Iterable[etcdrpc.Compare] = (), success: Iterable[etcdrpc.RequestOp] = (),
        failure: Iterable[etcdrpc.RequestOp] = ()) -> etcdrpc.TxnResponse:
    """Run one transaction: if every ``compare`` holds, ``success``, else ``failure``."""
    return _call(client, "Txn", txn_request(compare, success, failure))


def get(client: Any, key: Key, **options: Any) -> etcdrpc.RangeResponse:
    """One range read outside a transaction (``kvs``, ``count``, ``header.revision``)."""
    return _call(client, "Range", range_request(key, **options))


def run(client: Any, op: etcdrpc.RequestOp) -> Any:
    """Run one built op (:func:`put`, :func:`delete`, :func:`range_`) on its own, outside a transaction.

    The op goes as its own RPC (``Put``, ``DeleteRange``, ``Range``), not as a one-op ``Txn``;
    returns that RPC's response (``PutResponse``, ``DeleteRangeResponse`` with ``deleted``...).
    Example: ``ops.run(client, ops.delete(prefix, prefix=True)).deleted``.
    """
    field = op.WhichOneof("request")
    if field not in _LONE_METHODS:
        raise ValueError(f"ops.run runs a put, delete or range op (got {field!r}); a txn goes to ops.txn")
    return _call(client, _LONE_METHODS[field], getattr(op, field))


def pages(client: Any, key: Key, *, prefix: bool = False, range_end: Key | None = None, keys_only: bool = False,
          limit: int = PAGE_KEYS) -> Iterator[list[Any]]:
    """Every key under ``key`` (``prefix``) or in [key, range_end), ``limit`` keys per read, in key order.

    The one way to read a range that grows with the work: no reply is unbounded. A page whose
    values exceed gRPC's receive limit is read again at half the size (down to one key). Keys
    added or deleted meanwhile may or may not be seen (each page is read at its own revision).
    """
    request = range_request(key, prefix=prefix, range_end=range_end, keys_only=keys_only, limit=limit)
    while True:
        try:
            response = _call(client, "Range", request)
        except grpc.RpcError as exc:
            if not is_reply_too_large(exc) or request.limit == 1:
                raise
            request.limit = max(1, request.limit // 2)
            continue
        if response.kvs:
            yield list(response.kvs)
        if not response.more or not response.kvs:
            return
        request.key = response.kvs[-1].key + b"\0"  # the next key after the last one read


def scan(client: Any, key: Key, **options: Any) -> Iterator[Any]:
    """The key-values of :func:`pages`, one by one."""
    for page in pages(client, key, **options):
        yield from page


# -- leases ------------------------------------------------------------------------------


def grant(client: Any, ttl: int) -> int:
    """A new lease of ``ttl`` seconds (etcd's ``LeaseGrant``); its id."""
    return _call(client, "LeaseGrant", etcdrpc.LeaseGrantRequest(TTL=ttl), service="Lease").ID


def keep_alive(client: Any, lease: int) -> int:
    """Refresh ``lease`` once (one request on etcd's ``LeaseKeepAlive`` stream); the TTL it has again.

    0 or less: etcd no longer knows the lease (it expired or was revoked), or sent no answer.
    """
    request = iter([etcdrpc.LeaseKeepAliveRequest(ID=lease)])
    responses = client.call("LeaseKeepAlive", request, service="Lease", stream=True)
    return responses[-1].TTL if responses else 0


def revoke(client: Any, lease: int) -> None:
    """Revoke ``lease`` (etcd's ``LeaseRevoke``): the keys attached to it are deleted now.

    :class:`LeaseNotFound` if etcd no longer knows it (it expired, or was revoked already).
    """
    _call(client, "LeaseRevoke", etcdrpc.LeaseRevokeRequest(ID=lease), service="Lease")


def lease_ttl(client: Any, lease: int) -> int:
    """Seconds ``lease`` has left (etcd's ``LeaseTimeToLive``); -1 once etcd no longer knows it."""
    return _call(client, "LeaseTimeToLive", etcdrpc.LeaseTimeToLiveRequest(ID=lease), service="Lease").TTL


def _call(client: Any, method: str, request: Any, service: str = "KV") -> Any:
    """The library's one call site for a KV or lease RPC: deadline, auth metadata, errors mapped."""
    try:
        return client.call(method, request, service=service)  # errors mapped by status code (client.classify)
    except grpc.RpcError as exc:
        if is_lease_not_found(exc):
            raise LeaseNotFound(exc.details()) from exc
        raise


# -------------------- group_commit: Group commit: transactions from concurrent threads of one process share
#   one etcd transaction.
#
# Every etcd write is a Raft proposal and a disk sync; 64 threads each publishing a message or
# storing a result make 64 proposals. Here a thread whose transaction arrives while another is in
# flight waits; when that one returns, one waiting thread runs every waiting transaction as one
# (compares ANDed, success ops concatenated) and hands each caller its own part of the response.
# Each caller still returns only once etcd has committed its own writes. A lone caller runs its
# transaction at once, as before. If the combined compares fail, or etcd refuses the combined
# request (a lost lease, too large), each caller runs its own transaction alone, so no caller's
# outcome depends on another's; a connection error reaches every caller of the batch, as it would
# have reached each of them alone (the writes may or may not have been applied).




class _Pending:
    """One caller's transaction and, once run, its outcome."""

    __slots__ = ("compare", "success", "failure", "size", "response", "error", "alone", "done")

    def __init__(self, compare: list, success: list, failure: list) -> None:
        self.compare, self.success, self.failure = compare, success, failure
        self.size = sum(op.ByteSize() for op in success)
        self.response: Any = None
        self.error: BaseException | None = None
        self.alone = False
        self.done = False


class GroupCommit:
    """Runs :func:`txn` for many threads, sharing transactions while one is in flight."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._queue: list[_Pending] = []
        self._busy = False
        self._cond = threading.Condition()

    def txn(self, compare: Iterable[etcdrpc.Compare] = (), success: Iterable[etcdrpc.RequestOp] = (),
            failure: Iterable[etcdrpc.RequestOp] = ()) -> etcdrpc.TxnResponse:
        """As :func:`txn`, returning once this transaction's writes are committed (or refused)."""
        return self.txn_many([(compare, success, failure)])[0]

    def txn_many(self, transactions: Iterable[tuple[Iterable, Iterable, Iterable]]) -> list[etcdrpc.TxnResponse]:
        """Several ``(compare, success, failure)`` transactions of one caller, sharing etcd
        transactions with each other and with other threads'; their responses, in order."""
        mine = [_Pending(list(compare), list(success), list(failure)) for compare, success, failure in transactions]
        with self._cond:
            self._queue.extend(mine)
            while not all(pending.done for pending in mine):
                if self._busy:
                    self._cond.wait()
                    continue
                self._busy, batch = True, self._take()
                self._cond.release()
                try:
                    self._run(batch)
                except BaseException as exc:  # never leave a caller of the batch waiting
                    self._finish([p for p in batch if not p.done], error=exc)
                    raise
                finally:
                    self._cond.acquire()
                    self._busy = False
                    self._cond.notify_all()
        for pending in mine:
            if pending.error is not None:
                raise pending.error
        return [txn(self.client, p.compare, p.success, p.failure) if p.alone else p.response for p in mine]

    def _take(self) -> list[_Pending]:
        """The oldest waiting transactions that fit in one etcd transaction."""
        batch: list[_Pending] = []
        compares = successes = size = 0
        for pending in self._queue:
            compares += len(pending.compare)
            successes += len(pending.success)
            size += pending.size
            if batch and (compares > MAX_TXN_OPS or successes > MAX_TXN_OPS or size > MAX_TXN_BYTES):
                break
            batch.append(pending)
        del self._queue[:len(batch)]
        return batch

    def _run(self, batch: list[_Pending]) -> None:
        if len(batch) == 1:  # nobody to share with: exactly the caller's own transaction
            pending = batch[0]
            try:
                pending.response = txn(self.client, pending.compare, pending.success, pending.failure)
            except Exception as exc:  # noqa: BLE001 - re-raised in the caller's thread
                pending.error = exc
            pending.done = True
            return
        try:
            response = txn(self.client, [c for p in batch for c in p.compare],
                               [op for p in batch for op in p.success])
        except CONNECTION_ERRORS as exc:
            self._finish(batch, error=exc)
            return
        except (grpc.RpcError, LeaseNotFound) as exc:  # refused as a whole: each runs alone
            logger.debug("shared transaction of %d refused (%s); each runs alone", len(batch), exc)
            self._finish(batch, alone=True)
            return
        except Exception as exc:  # noqa: BLE001 - re-raised in every caller's thread
            self._finish(batch, error=exc)
            return
        if not response.succeeded:
            self._finish(batch, alone=True)
            return
        start = 0
        for pending in batch:
            end = start + len(pending.success)
            pending.response = etcdrpc.TxnResponse(header=response.header, succeeded=True,
                                                   responses=response.responses[start:end])
            pending.done, start = True, end

    @staticmethod
    def _finish(batch: list[_Pending], *, error: BaseException | None = None, alone: bool = False) -> None:
        for pending in batch:
            pending.error, pending.alone, pending.done = error, alone, True


_shared = PerProcess()


def shared(client: Any) -> GroupCommit:
    """This process's :class:`GroupCommit` for ``client`` (publishes and result writes share it)."""
    return _shared.get((id(client),), lambda: GroupCommit(client), usable=lambda committer: committer.client is client)


# -------------------- leases: Shared leases: keys that may expire together hang on one etcd lease (the one
#   lease pool).
#
# A lease per key would leave one lease per message or result in etcd. Instead each process
# keeps one lease per *slot*: the deadlines ``(slot-1)*g < d <= slot*g`` for a granularity
# ``g`` share the lease granted to end at ``slot*g``, never before a deadline, at most ``g`` after.
#
# - Message TTLs (transport/channel.py, delayed.py): ``lease_for(deadline)``, ``g`` = 1 s
#   (one grant per second; the deadline in the key makes delivery exact to the millisecond).
# - Results (backend/result_store.py): ``lease_for_ttl(ttl)``, ``g`` = a tenth of the TTL
#   between 1 s and 1 h (:func:`bucket_seconds`): a result lives between ``ttl`` and ``ttl + g``.
#
# A lease etcd no longer knows (it ended early, a restore) is :meth:`LeasePool.forget`-ten and the
# caller writes again with a fresh one. :func:`pool_for` is the process's pool per etcd
# configuration (a forked child gets its own).


#: Slot width for results as a fraction of their TTL (so at most TTL/width + 1 live leases per TTL).
BUCKET_FRACTION = 0.1
#: Narrowest slot for results (seconds): also the granularity of message-TTL leases.
MIN_BUCKET_SECONDS = 1.0
#: Widest slot for results (seconds): a 1-day result lives at most 1 h longer.
MAX_BUCKET_SECONDS = 3600.0


def bucket_seconds(ttl: float) -> float:
    """Width of the slot whose writes share one lease when they live ``ttl`` seconds."""
    return min(max(ttl * BUCKET_FRACTION, MIN_BUCKET_SECONDS), MAX_BUCKET_SECONDS)


class LeasePool:
    """Leases by (granularity, slot), each granted once and shared by every key in its slot."""

    def __init__(self, client) -> None:
        self.client = client
        self._leases: dict[tuple[float, int], int] = {}
        self._lock = threading.Lock()

    def lease_for(self, deadline: float, granularity: float = MIN_BUCKET_SECONDS) -> int:
        """A lease that ends at or after ``deadline`` (epoch seconds), at most ``granularity`` later."""
        slot = math.ceil(deadline / granularity)
        ends = slot * granularity
        with self._lock:
            now = time.time()
            for stale in [key for key in self._leases if key[1] * key[0] < now]:
                del self._leases[stale]
            lease = self._leases.get((granularity, slot))
            if lease is None:
                ttl = max(1, math.ceil(ends - now))
                lease = self._leases[(granularity, slot)] = grant(self.client, ttl)
                logger.debug("granted shared lease %x (ttl %ss) for slot %s of %ss", lease, ttl, slot, granularity)
            return lease

    def lease_for_ttl(self, ttl: float | None) -> int:
        """A lease for a key written now that lives ``ttl`` seconds (up to a bucket longer); 0: no lease."""
        if not ttl:
            return 0
        return self.lease_for(time.time() + ttl, bucket_seconds(ttl))

    def forget(self, lease: int) -> None:
        """etcd no longer knows ``lease``: the next key of its slot gets a new one."""
        with self._lock:
            self._leases = {key: value for key, value in self._leases.items() if value != lease}


_pools = PerProcess()


def pool_for(config: EtcdConfig) -> LeasePool:
    """This process's :class:`LeasePool` for an etcd configuration (on its shared client)."""
    return _pools.get((config,), lambda: LeasePool(get_client(config)))


def forget_pools() -> None:
    """Forget every pool of this process (tests, shutdown): the next key gets a new lease."""
    _pools.clear()
