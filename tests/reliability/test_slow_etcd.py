"""Fault: a slow etcd (200 ms added each way, for every client) stays correct: completed = sent, none lost."""
from __future__ import annotations

import time

import pytest

from etcd_broker.client import get_client
from tests.reliability import counting_app
from tests.reliability.blackhole import BlackholeProxy
from tests.reliability.counting import Collector, Producer, Tally, locate, wait_for_completion

APP = "tests.reliability.counting_app"
LEASE_TTL = 3
TASKS = 24
TASK_SECONDS = 0.1
#: Added to every chunk in each direction: a 400 ms round trip to etcd.
LATENCY = 0.2


@pytest.mark.reliability
def test_a_slow_etcd_loses_and_refuses_nothing(etcd_url, etcd_prefix, worker_factory, summary):
    proxy = BlackholeProxy(int(etcd_url.rsplit(":", 1)[1]), latency=LATENCY)
    try:
        counting_app.configure(proxy.url, etcd_prefix, LEASE_TTL, backend=True)
        env = counting_app.worker_env(proxy.url, etcd_prefix, LEASE_TTL, backend=True)
        workers = [worker_factory(app=APP, env=env, concurrency=2) for _ in range(2)]
        producer = Producer(TASKS, TASK_SECONDS, interval=0.02)
        collector = Collector(producer, timeout=60)
        started_at = time.time()
        producer.start()
        collector.start()
        client = get_client(etcd_url)  # the test counts on a direct connection
        wait_for_completion(client, etcd_prefix, producer, timeout=60)
        collector.join(60)

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
