"""Reads over sets that grow with the work are paged, and the sweeper outlives an unexpected error (issue 20 item 3).

A worker holding ~19k prefetched messages once made the sweep's one read of ``unacked/`` exceed
gRPC's 8 MiB receive limit; the sweep thread caught only connection errors, so it ended for good.
"""
from __future__ import annotations

import json
import logging

from kombu import Connection

from etcd_broker.core import ops
from etcd_broker.core.client import GRPC_MAX_MESSAGE_BYTES, get_client
from etcd_broker.core.ops import KeySpace, range_end
from tests.helpers import wait_until

#: Values of this size: a dozen make one reply larger than gRPC's receive limit.
BIG_VALUE = b"x" * 1_000_000


def test_a_range_larger_than_one_reply_is_read_whole_in_key_order(etcd_url, etcd_prefix):
    client = get_client(etcd_url)
    prefix = f"{etcd_prefix}/paged/"
    keys = [f"{prefix}{i:05d}" for i in range(ops.PAGE_KEYS + 150)]  # more than one page of keys
    for start in range(0, len(keys), 100):
        ops.txn(client, success=[ops.put(key, b"v") for key in keys[start:start + 100]])
    big = [f"{etcd_prefix}/big/{i:02d}" for i in range(12)]
    for key in big:
        client.put(key, BIG_VALUE)
    assert 12 * len(BIG_VALUE) > GRPC_MAX_MESSAGE_BYTES

    assert [kv.key.decode() for kv in ops.scan(client, prefix, prefix=True, keys_only=True)] == keys
    read = list(ops.scan(client, f"{etcd_prefix}/big/", prefix=True))  # one read would be refused
    assert [kv.key.decode() for kv in read] == big
    assert all(kv.value == BIG_VALUE for kv in read)


def test_the_sweeper_goes_on_after_an_unexpected_error(etcd_url, etcd_prefix, caplog):
    client = get_client(etcd_url)
    keys = KeySpace(etcd_prefix)
    junk = keys.unacked("work") + "not-a-lease/9/1"  # a key the sweep cannot parse: its read raises ValueError
    client.put(junk, b"{}")
    caplog.set_level(logging.ERROR, logger="etcd_broker.transport.consumer")
    with Connection(etcd_url, transport_options={"prefix": etcd_prefix, "lease_ttl": 3}) as conn:
        queue = conn.SimpleQueue("work")
        queue.put({"n": 0})
        assert queue.get(timeout=10).payload == {"n": 0}  # consumer lease and its sweeper started
        wait_until(lambda: "sweep failed" in caplog.text, timeout=30, message="the sweep met the junk key")
        client.delete(junk)
        # a dead consumer's message (no consumer key for its lease): the sweeper must still give it back
        orphan = keys.unacked_message("work", 0x1234, "9/00000000000000000001-0000")
        client.put(orphan, json.dumps(_message({"n": 1})))
        ready = keys.ready("work")
        wait_until(lambda: client.get_range_response(ready, range_end(ready), count_only=True).count
                   or queue.qsize() or client.get(orphan)[0] is None, timeout=60,
                   message="the sweeper restored the orphan after its failure")
        assert queue.get(timeout=10).payload == {"n": 1}
        queue.close()


def _message(payload: dict) -> dict:
    """A kombu message as the transport stores it (JSON body)."""
    return {"body": json.dumps(payload), "content-encoding": "utf-8", "content-type": "application/json",
            "headers": {}, "properties": {"delivery_info": {"exchange": "work", "routing_key": "work"},
                                          "priority": 0, "body_encoding": "utf-8", "delivery_tag": "t1"}}
