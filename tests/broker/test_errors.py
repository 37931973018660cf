"""etcd's errors, provoked on a real etcd, are told apart by gRPC status code (client.classify)."""
from __future__ import annotations

import grpc
import pytest
from etcd3 import etcdrpc

from etcd_broker.core import ops
from etcd_broker.core.client import (
    COMPACTED,
    CONNECTION_ERRORS,
    REQUEST_TOO_LARGE,
    TOO_MANY_OPS,
    UNREACHABLE,
    classify,
    get_client,
    is_lease_not_found,
    is_request_too_large,
    make_client,
)
from etcd_broker.exceptions import EtcdUnreachable
from scripts.etcd_server import MAX_REQUEST_BYTES


def test_a_request_over_the_server_limit_is_request_too_large(etcd_url, etcd_prefix):
    client = get_client(etcd_url)
    with pytest.raises(grpc.RpcError) as caught:
        client.call("Put", etcdrpc.PutRequest(key=f"{etcd_prefix}/big".encode(), value=b"x" * (MAX_REQUEST_BYTES + 1)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert classify(caught.value) == REQUEST_TOO_LARGE
    assert is_request_too_large(caught.value)


def test_too_many_operations_share_the_code_and_differ_by_message(etcd_url, etcd_prefix):
    client = get_client(etcd_url)
    puts = [ops.put(f"{etcd_prefix}/op{i}", b"v") for i in range(200)]  # etcd allows 128
    with pytest.raises(grpc.RpcError) as caught:
        client.call("Txn", etcdrpc.TxnRequest(success=puts))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert classify(caught.value) == TOO_MANY_OPS


def test_a_put_on_an_unknown_lease_is_lease_not_found(etcd_url, etcd_prefix):
    client = get_client(etcd_url)
    with pytest.raises(grpc.RpcError) as caught:
        client.call("Put", etcdrpc.PutRequest(key=f"{etcd_prefix}/leased".encode(), value=b"v", lease=0x7E57))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert is_lease_not_found(caught.value)
    with pytest.raises(ops.LeaseNotFound):
        ops.txn(client, compare=[], success=[ops.put(f"{etcd_prefix}/leased", b"v", lease=0x7E57)])


def test_a_compacted_revision_is_compacted(etcd_url, etcd_prefix):
    client = get_client(etcd_url)
    key = f"{etcd_prefix}/c".encode()
    first = client.call("Put", etcdrpc.PutRequest(key=key, value=b"1")).header.revision
    last = client.call("Put", etcdrpc.PutRequest(key=key, value=b"2")).header.revision
    client.call("Compact", etcdrpc.CompactionRequest(revision=last))
    with pytest.raises(grpc.RpcError) as caught:
        client.call("Range", etcdrpc.RangeRequest(key=key, revision=first))
    assert classify(caught.value) == COMPACTED


def test_nothing_listening_is_a_connection_error_that_says_where(etcd_url):
    client = make_client("etcdv3://127.0.0.1:1", timeout=1)
    try:
        with pytest.raises(CONNECTION_ERRORS) as caught:
            client.call("Range", etcdrpc.RangeRequest(key=b"/k"))
        assert isinstance(caught.value, EtcdUnreachable)
        assert "127.0.0.1:1" in str(caught.value)
        assert classify(caught.value.__cause__) == UNREACHABLE
    finally:
        client.close()


def test_anything_that_is_not_a_grpc_error_has_no_kind():
    assert classify(ValueError("etcdserver: request is too large")) is None
