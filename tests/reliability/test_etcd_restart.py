"""Fault 2: etcd is killed and restarted (same data dir) under load; producers and workers recover by themselves."""
from __future__ import annotations

import time

import pytest

from etcd_broker.core.client import get_client
from tests.reliability.counting import (
    WORKER_POOL,
    Tally,
    assert_every_task_ran_once,
    start_traffic,
    wait_for_completion,
)

LEASE_TTL = 3
TASKS = 120
TASK_SECONDS = 0.2
#: etcd stays down this long: longer than the lease TTL, so leases must survive the restart.
OUTAGE_SECONDS = 4.0


@pytest.mark.reliability
def test_producers_and_workers_ride_out_an_etcd_restart_and_none_is_lost(
        private_etcd, etcd_prefix, counting_workers, summary):
    url = private_etcd.url
    workers = counting_workers(url, 2, lease_ttl=LEASE_TTL, concurrency=4, pool=WORKER_POOL)
    producer, collector = start_traffic(TASKS, TASK_SECONDS, interval=0.05, timeout=120)

    producer.sent_half.wait(60)
    private_etcd.stop(kill=True)
    stopped_at = time.time()
    time.sleep(OUTAGE_SECONDS)
    private_etcd.start()
    restarted_at = time.time()
    client = get_client(url)
    wait_for_completion(client, etcd_prefix, producer, timeout=120, collector=collector)

    tally = Tally.collect("etcd SIGKILLed, down 4 s, restarted", client, etcd_prefix, producer, stopped_at,
                          fault_end=restarted_at, collector=collector)
    summary(tally)
    assert_every_task_ran_once(tally, client, etcd_prefix, TASKS, collector)
    assert tally.first_completion_after_fault() is not None
    assert all(worker.process.poll() is None for worker in workers), "a worker died instead of reconnecting"
