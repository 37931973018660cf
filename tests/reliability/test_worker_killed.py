"""Fault 1: a worker is SIGKILLed while it runs long tasks; they finish on another worker, none is lost."""
from __future__ import annotations

import os
import time

import pytest

from etcd_broker.core.client import get_client
from tests.helpers import wait_until
from tests.reliability.counting import Producer, Tally, locate, read_markers, wait_for_completion

#: A short lease keeps the test quick; FAULT_TEST_LEASE_TTL=10 measures the default (docs/reliability.md).
LEASE_TTL = int(os.environ.get("FAULT_TEST_LEASE_TTL", "3"))
TASKS = 36
TASK_SECONDS = 1.0
#: Expiry is noticed by a watch on consumer keys; the 30 s safety sweep must not be what saves them.
REDELIVERY_BOUND = LEASE_TTL + 10


def running_on(client, prefix: str, pid: int) -> list[str]:
    """Tasks that process ``pid`` has started and not finished."""
    started = read_markers(client, prefix, "started")
    done = read_markers(client, prefix, "done")
    return [task for task, runs in started.items()
            if any(run["pid"] == pid for run in runs) and not any(run["pid"] == pid for run in done.get(task, ()))]


@pytest.mark.reliability
@pytest.mark.parametrize("task", ["work", "work_batch"])
def test_a_killed_workers_tasks_finish_on_other_workers_and_none_is_lost(
        etcd_url, etcd_prefix, counting_workers, summary, task):
    workers = counting_workers(etcd_url, 3, lease_ttl=LEASE_TTL, backend=False)
    victim = workers[0].process.pid
    client = get_client(etcd_url)
    producer = Producer(TASKS, TASK_SECONDS, interval=0.05, task=task)
    producer.start()

    wait_until(lambda: len(running_on(client, etcd_prefix, victim)) == 2, timeout=60, message="victim busy")
    workers[0].kill()
    killed_at = time.time()
    in_flight = running_on(client, etcd_prefix, victim)  # final: the victim writes nothing more
    assert in_flight
    wait_for_completion(client, etcd_prefix, producer, timeout=90)

    tally = Tally.collect(f"worker SIGKILLed mid-task ({task}, lease TTL {LEASE_TTL} s)", client, etcd_prefix, producer, killed_at)
    summary(tally)
    assert tally.refused == [] and tally.unexpected == []
    assert tally.lost == [], locate(client, etcd_prefix, tally.lost)
    assert tally.completed == TASKS
    for task in in_flight:  # what the victim was running started again, on a live worker
        assert [run["pid"] for run in tally.done[task]] != [victim]
        assert any(run["redelivered"] for run in tally.started[task])
    # at-least-once: only a task the victim finished but had not yet acked may run twice
    finished_by_victim = {task for task, runs in tally.done.items() if any(r["pid"] == victim for r in runs)}
    assert set(tally.duplicated) <= finished_by_victim
    assert max(tally.redelivery_delays()) < REDELIVERY_BOUND
    assert all(worker.process.poll() is None for worker in workers[1:])
