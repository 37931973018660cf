"""Fault 2: etcd is killed and restarted (same data dir) under load; producers and workers recover by themselves."""
from __future__ import annotations

import time

import pytest

from etcd_broker.client import get_client
from tests.reliability import counting_app
from tests.reliability.counting import (
    WORKER_POOL,
    Collector,
    Producer,
    Tally,
    locate,
    wait_all_settled,
    wait_for_completion,
)

APP = "tests.reliability.counting_app"
LEASE_TTL = 3
TASKS = 120
TASK_SECONDS = 0.2
#: etcd stays down this long: longer than the lease TTL, so leases must survive the restart.
OUTAGE_SECONDS = 4.0


@pytest.mark.reliability
def test_producers_and_workers_ride_out_an_etcd_restart_and_none_is_lost(
        private_etcd, etcd_prefix, worker_factory, summary):
    url = private_etcd.url
    counting_app.configure(url, etcd_prefix, LEASE_TTL, backend=True)
    env = counting_app.worker_env(url, etcd_prefix, LEASE_TTL, backend=True)
    workers = [worker_factory(app=APP, env=env, concurrency=4, pool=WORKER_POOL) for _ in range(2)]
    producer = Producer(TASKS, TASK_SECONDS, interval=0.05)
    collector = Collector(producer, timeout=120)
    producer.start()
    collector.start()

    producer.sent_half.wait(60)
    private_etcd.stop(kill=True)
    stopped_at = time.time()
    time.sleep(OUTAGE_SECONDS)
    private_etcd.start()
    restarted_at = time.time()
    client = get_client(url)
    wait_for_completion(client, etcd_prefix, producer, timeout=120)
    collector.join(120)

    tally = Tally.collect("etcd SIGKILLed, down 4 s, restarted", client, etcd_prefix, producer, stopped_at,
                          fault_end=restarted_at, collector=collector)
    summary(tally)
    assert tally.refused == [], "a producer gave up instead of waiting for etcd"
    assert tally.unexpected == []
    assert tally.lost == [], locate(client, etcd_prefix, tally.lost)
    assert tally.completed == TASKS
    assert tally.duplicated == [], "a task ran twice although no worker died"
    assert wait_all_settled(client, etcd_prefix, tally.accepted) == {}, "a message outlived its task"
    assert collector.failed == [] and sorted(tally.fetched) == sorted(tally.accepted)
    assert tally.first_completion_after_fault() is not None
    assert all(worker.process.poll() is None for worker in workers), "a worker died instead of reconnecting"
