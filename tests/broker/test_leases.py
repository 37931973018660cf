"""The one lease pool (etcd_broker.core.ops) on a real etcd: keys whose deadlines share a slot
share one lease, which ends at or after every deadline and at most one slot later; a lease etcd
lost is forgotten; a forked child gets its own pool."""
from __future__ import annotations

import os
import time

from etcd_broker.core import ops
from etcd_broker.core.client import EtcdConfig, get_client


def _remaining(client, lease: int) -> int:
    return client.get_lease_info(lease).TTL


def test_deadlines_in_one_second_share_a_lease_that_ends_no_earlier(etcd_url):
    config = EtcdConfig.from_url(etcd_url)
    pool = ops.pool_for(config)
    assert ops.pool_for(config) is pool
    deadline = float(int(time.time()) + 30)  # a whole second: deadlines just after it are in the next slot
    same = {pool.lease_for(deadline - 0.9), pool.lease_for(deadline - 0.5), pool.lease_for(deadline)}
    assert len(same) == 1
    assert pool.lease_for(deadline + 0.1) not in same
    remaining = _remaining(get_client(config), same.pop())
    assert deadline - time.time() - 1 <= remaining <= deadline - time.time() + 2


def test_results_share_a_bucket_of_a_tenth_of_their_ttl(etcd_url):
    pool = ops.pool_for(EtcdConfig.from_url(etcd_url))
    assert ops.bucket_seconds(100) == 10 and ops.bucket_seconds(3) == 1 and ops.bucket_seconds(10**6) == 3600
    assert pool.lease_for_ttl(None) == 0 and pool.lease_for_ttl(0) == 0
    start = time.time()
    lease = pool.lease_for_ttl(1000)  # bucket of 100 s: the next write shares it unless a boundary passed
    again = pool.lease_for_ttl(1000)
    assert again == lease or int((start + 1000) // 100) != int((time.time() + 1000) // 100)
    remaining = _remaining(pool.client, lease)
    assert 1000 - 2 <= remaining <= 1000 + 100 + 1


def test_a_forgotten_lease_is_replaced_and_a_child_has_its_own_pool(etcd_url):
    config = EtcdConfig.from_url(etcd_url)
    pool = ops.pool_for(config)
    deadline = time.time() + 60
    lease = pool.lease_for(deadline)
    pool.client.revoke_lease(lease)
    pool.forget(lease)
    assert pool.lease_for(deadline) != lease
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a new pool, whose leases work
        try:
            child_pool = ops.pool_for(config)
            fresh = child_pool is not pool and _remaining(child_pool.client, child_pool.lease_for(deadline)) > 0
            os.write(write, b"1" if fresh else b"0")
        finally:
            os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.waitpid(pid, 0)
    assert ops.pool_for(config) is pool
