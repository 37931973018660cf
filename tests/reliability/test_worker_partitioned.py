"""Fault: a worker is cut off from etcd (its proxy stops forwarding) for longer than its lease, then
reconnected. Its tasks run elsewhere; its late writes (results, acks) corrupt nothing; it works again."""
from __future__ import annotations

import time

import pytest

from etcd_broker.core.client import get_client
from tests.helpers import wait_until
from tests.reliability import counting_app
from tests.reliability.blackhole import BlackholeProxy
from tests.reliability.counting import Tally, locate, read_markers, start_traffic, wait_for_completion
from tests.reliability.test_worker_killed import running_on

APP = "tests.reliability.counting_app"
LEASE_TTL = 3
TASKS = 36
TASK_SECONDS = 1.0
#: The partition lasts longer than the lease, so etcd expires the cut-off worker's lease.
CUT_SECONDS = LEASE_TTL + 4


@pytest.mark.reliability
def test_a_partitioned_workers_tasks_run_elsewhere_and_its_late_writes_corrupt_nothing(
        etcd_url, etcd_prefix, worker_factory, summary):
    proxy = BlackholeProxy(int(etcd_url.rsplit(":", 1)[1]))
    try:
        counting_app.configure(etcd_url, etcd_prefix, LEASE_TTL, backend=True)
        cut_off = worker_factory(app=APP, env=counting_app.worker_env(proxy.url, etcd_prefix, LEASE_TTL, backend=True),
                                 concurrency=2)
        others = [worker_factory(app=APP, env=counting_app.worker_env(etcd_url, etcd_prefix, LEASE_TTL, backend=True),
                                 concurrency=2) for _ in range(2)]
        client = get_client(etcd_url)
        pid = cut_off.process.pid
        producer, collector = start_traffic(TASKS, TASK_SECONDS, interval=0.05, timeout=90)

        wait_until(lambda: len(running_on(client, etcd_prefix, pid)) == 2, timeout=60, message="cut-off worker busy")
        proxy.cut.set()
        cut_at = time.time()
        in_flight = running_on(client, etcd_prefix, pid)
        time.sleep(CUT_SECONDS)
        proxy.cut.clear()
        healed_at = time.time()
        wait_for_completion(client, etcd_prefix, producer, timeout=90, collector=collector)
        # the healed worker takes work again (its consumer re-registered under a new lease): with the
        # others stopped, it is the only one that can run these
        assert all(worker.process.poll() is None for worker in [cut_off, *others])
        for worker in others:
            worker.terminate()
        after = [counting_app.work.apply_async((0.1,)) for _ in range(8)]
        assert [result.get(timeout=60) for result in after] == [result.id for result in after]
        done = read_markers(client, etcd_prefix, "done")
        assert all(run["pid"] == pid for result in after for run in done[result.id])

        tally = Tally.collect(f"worker cut off from etcd {CUT_SECONDS} s (lease TTL {LEASE_TTL} s), healed",
                              client, etcd_prefix, producer, cut_at, fault_end=healed_at, collector=collector)
        summary(tally)
        assert tally.refused == [] and set(tally.unexpected) == {result.id for result in after}
        assert tally.lost == [], locate(client, etcd_prefix, tally.lost)
        assert tally.completed == TASKS
        for task in in_flight:  # what it was running when cut off ran again on a worker etcd could see,
            assert any(run["pid"] != pid for run in tally.done[task])
            assert any(run["pid"] == pid for run in tally.done[task])  # and it finished too: its writes came late
        # at-least-once: only what the cut-off worker was running may have run twice
        assert set(tally.duplicated) <= set(in_flight) | {t for t, runs in tally.started.items()
                                                          if any(r["pid"] == pid and r["at"] <= healed_at for r in runs)}
        # its late SUCCESS writes and acks corrupted nothing: every result is the task's own, every queue is empty
        assert collector.failed == [] and sorted(tally.fetched) == sorted(tally.accepted)
        assert locate(client, etcd_prefix, tally.accepted) == {task: [] for task in tally.accepted}
        assert cut_off.process.poll() is None
    finally:
        proxy.close()
