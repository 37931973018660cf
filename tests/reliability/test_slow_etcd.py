"""Fault: a slow etcd (200 ms added each way, for every client) stays correct: completed = sent, none lost."""
from __future__ import annotations

import time

import pytest

from etcd_broker.core.client import get_client
from tests.reliability.blackhole import BlackholeProxy
from tests.reliability.counting import Tally, locate, start_traffic, wait_for_completion

LEASE_TTL = 3
TASKS = 24
TASK_SECONDS = 0.1
#: Added to every chunk in each direction: a 400 ms round trip to etcd.
LATENCY = 0.2


@pytest.mark.reliability
def test_a_slow_etcd_loses_and_refuses_nothing(etcd_url, etcd_prefix, counting_workers, summary):
    proxy = BlackholeProxy(int(etcd_url.rsplit(":", 1)[1]), latency=LATENCY)
    try:
        workers = counting_workers(proxy.url, 2, lease_ttl=LEASE_TTL)
        started_at = time.time()
        producer, collector = start_traffic(TASKS, TASK_SECONDS, interval=0.02, timeout=60)
        client = get_client(etcd_url)  # the test counts on a direct connection
        wait_for_completion(client, etcd_prefix, producer, timeout=60, collector=collector)

        tally = Tally.collect(f"slow etcd (+{LATENCY * 1000:.0f} ms each way)", client, etcd_prefix, producer,
                              started_at, collector=collector)
        summary(tally)
        assert tally.refused == [] and tally.unexpected == []
        assert tally.lost == [], locate(client, etcd_prefix, tally.lost)
        assert tally.completed == TASKS
        assert collector.failed == [] and sorted(tally.fetched) == sorted(tally.accepted)
        assert all(worker.process.poll() is None for worker in workers)
    finally:
        proxy.close()
