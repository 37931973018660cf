"""etcd_broker.core.ops against a real etcd: compares, puts, deletes, ranges, errors by status code."""
from __future__ import annotations

import pytest

from etcd_broker.core import ops
from etcd_broker.core.client import get_client


@pytest.fixture
def client(etcd_url):
    return get_client(etcd_url)


def test_create_if_absent_succeeds_once_and_the_failure_branch_reads(client, etcd_prefix):
    key = f"{etcd_prefix}/ops/once"
    create = dict(compare=[ops.compare(key, "version", 0)], success=[ops.put(key, b"first")],
                  failure=[ops.range_(key)])
    first = ops.txn(client, **create)
    assert first.succeeded and first.header.revision > 0
    second = ops.txn(client, **create)
    assert not second.succeeded
    kv = ops.first_kv(second.responses[0])
    assert (kv.value, kv.mod_revision) == (b"first", first.header.revision)


def test_compare_results_and_value_targets(client, etcd_prefix):
    key = f"{etcd_prefix}/ops/cmp"
    revision = ops.txn(client, success=[ops.put(key, "v")]).header.revision
    assert ops.txn(client, compare=[ops.compare(key, "mod_revision", revision)]).succeeded
    assert ops.txn(client, compare=[ops.compare(key, "version", 0, ">")]).succeeded
    assert ops.txn(client, compare=[ops.compare(key, "value", "v")]).succeeded
    assert not ops.txn(client, compare=[ops.compare(key, "value", b"w")]).succeeded
    assert ops.txn(client, compare=[ops.compare(key, "create_revision", revision + 1, "<")]).succeeded


def test_prefix_ranges_count_keys_only_and_limit_and_prefix_delete(client, etcd_prefix):
    prefix = f"{etcd_prefix}/ops/many/"
    ops.txn(client, success=[ops.put(prefix + str(n), b"x" * 10) for n in range(5)])
    response = ops.txn(client, success=[ops.range_(prefix, prefix=True, count_only=True),
                                        ops.range_(prefix, prefix=True, keys_only=True, limit=2)])
    assert ops.count(response.responses[0]) == 5
    limited = response.responses[1].response_range
    assert [kv.key for kv in limited.kvs] == [f"{prefix}0".encode(), f"{prefix}1".encode()]
    assert all(kv.value == b"" for kv in limited.kvs) and limited.more
    ops.txn(client, success=[ops.delete(prefix, prefix=True)])
    assert ops.get(client, prefix, prefix=True, count_only=True).count == 0


def test_a_put_on_a_lease_etcd_does_not_know_raises_lease_not_found(client, etcd_prefix):
    with pytest.raises(ops.LeaseNotFound):
        ops.txn(client, success=[ops.put(f"{etcd_prefix}/ops/leased", b"x", lease=0x7E57)])


@pytest.mark.parametrize(("call", "message"), [
    (lambda: ops.compare("k", "size", 1), "compare target must be one of"),
    (lambda: ops.compare("k", "version", 1, ">="), "compare result must be one of"),
    (lambda: ops.range_("k", limit=-1), "limit must be >= 0"),
    (lambda: ops.range_("k", prefix=True, range_end="l"), "prefix=True or range_end"),
])
def test_bad_arguments_are_refused_naming_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_a_granted_lease_counts_down_and_reads_minus_one_once_revoked(client, etcd_prefix):
    lease = ops.grant(client, 30)
    assert 25 <= ops.lease_ttl(client, lease) <= 30
    ops.txn(client, success=[ops.put(f"{etcd_prefix}/ops/leased", b"v", lease)])
    ops.revoke(client, lease)
    assert ops.lease_ttl(client, lease) == -1
    assert ops.get(client, f"{etcd_prefix}/ops/leased").count == 0
    with pytest.raises(ops.LeaseNotFound):  # gone already
        ops.revoke(client, lease)


def test_run_sends_one_op_as_its_own_rpc_and_refuses_a_txn(client, etcd_prefix):
    prefix = f"{etcd_prefix}/ops/lone/"
    put = ops.run(client, ops.put(prefix + "a", b"1"))
    ops.run(client, ops.put(prefix + "b", b"2"))
    assert put.header.revision > 0 and not put.HasField("prev_kv")  # a PutResponse, not a TxnResponse
    assert [kv.value for kv in ops.run(client, ops.range_(prefix, prefix=True)).kvs] == [b"1", b"2"]
    assert ops.run(client, ops.delete(prefix + "a")).deleted == 1
    assert ops.run(client, ops.delete(prefix, prefix=True)).deleted == 1
    with pytest.raises(ops.LeaseNotFound):
        ops.run(client, ops.put(prefix + "c", b"x", lease=0x7E57))
    txn_op = ops.etcdrpc.RequestOp(request_txn=ops.etcdrpc.TxnRequest())
    with pytest.raises(ValueError, match="ops.txn"):
        ops.run(client, txn_op)


def test_keep_alive_renews_a_live_lease_and_reads_zero_once_it_is_gone(client):
    lease = ops.grant(client, 30)
    assert ops.keep_alive(client, lease) == 30
    ops.revoke(client, lease)
    assert ops.keep_alive(client, lease) <= 0
