"""etcd transactions: the one way this library builds and runs one.

Builders return ``etcd3.etcdrpc`` protobufs (``Compare`` and ``RequestOp``); :func:`txn`
runs them in one round trip and returns etcd's raw ``TxnResponse``, whose
``header.revision`` is the revision the transaction ran at. :func:`get` is the same
for a lone range read. gRPC errors come back as our connection errors
(``etcd_broker.core.client.CONNECTION_ERRORS``) or :class:`LeaseNotFound`.

Example::

    from etcd_broker.core import ops
    response = ops.txn(client,
                       compare=[ops.compare(key, "mod_revision", 0)],
                       success=[ops.put(key, b"value", lease=lease_id)],
                       failure=[ops.range_(key)])
    if not response.succeeded:
        current = ops.first_kv(response.responses[0])
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import Any

import grpc
from etcd3 import etcdrpc
from etcd3.utils import prefix_range_end, to_bytes

from etcd_broker.core.client import is_lease_not_found, is_reply_too_large

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
