"""A burst of tasks is shared: no worker claims more than its prefetch while another one idles."""
from __future__ import annotations

import time
from collections import Counter

import pytest

from etcd_broker.core.client import get_client
from etcd_broker.core.ops import KeySpace
from tests.reliability.counting import Producer, read_markers, wait_for_completion

WORKERS = 3
CONCURRENCY = 2  # x worker_prefetch_multiplier 1 = prefetch 2 per worker
TASKS = 36
TASK_SECONDS = 0.5


def held_per_consumer(client, prefix: str) -> Counter:
    keys = KeySpace(prefix)
    return Counter(keys.lease_of_unacked(meta.key) for _, meta in client.get_prefix(keys.unacked("celery"),
                                                                                    keys_only=True))


@pytest.mark.reliability
def test_a_burst_is_shared_and_no_worker_holds_more_than_its_prefetch(etcd_url, etcd_prefix, counting_workers):
    workers = counting_workers(etcd_url, WORKERS, backend=False, concurrency=CONCURRENCY)
    client = get_client(etcd_url)
    producer = Producer(TASKS, TASK_SECONDS, interval=0.02)  # faster than the workers: a backlog forms
    producer.start()
    most_held = 0
    while producer.is_alive() or sum(held_per_consumer(client, etcd_prefix).values()):
        most_held = max([most_held, *held_per_consumer(client, etcd_prefix).values()])
        time.sleep(0.1)
    wait_for_completion(client, etcd_prefix, producer, timeout=60)

    ran = Counter(runs[0]["pid"] for runs in read_markers(client, etcd_prefix, "started").values())
    # An ack is deleted by a batching thread a moment after the next claim: allow one in flight per slot.
    assert most_held <= 2 * CONCURRENCY, f"a worker held {most_held} messages with a prefetch of {CONCURRENCY}"
    assert sorted(ran) == sorted(w.process.pid for w in workers)
    assert min(ran.values()) >= TASKS // WORKERS // 2, f"tasks per worker: {sorted(ran.values())}"
