"""Fault 3: the leader of a three-member etcd cluster is SIGKILLed under load; then it restarts and rejoins."""
from __future__ import annotations

import time

import pytest

from etcd_broker.core.client import CONNECTION_ERRORS, get_client, make_client
from scripts.etcd_server import EtcdServer, cluster_url
from tests.helpers import wait_until
from tests.reliability.cluster_tools import (
    busiest_member,
    connected_ports,
    leader_of,
    make_leader,
    member_status,
)
from tests.reliability.counting import (
    WORKER_POOL,
    Tally,
    assert_every_task_ran_once,
    read_markers,
    start_traffic,
    wait_for_completion,
)

LEASE_TTL = 3
TASKS = 120
TASK_SECONDS = 0.2


def lead_where_workers_are(cluster: list[EtcdServer], pids: list[int]) -> tuple[EtcdServer, int]:
    """Make the member most workers talk to the leader, so that killing it makes workers fail over.

    A leader change can itself move clients to another member, so look again after each move.
    """
    for _ in range(5):
        target, connected = busiest_member(cluster, pids)
        make_leader(cluster, target)
        time.sleep(1.0)
        target, connected = busiest_member(cluster, pids)
        if connected and leader_of(cluster) is target:
            return target, connected
    raise AssertionError("could not put the leader where the workers are connected")


@pytest.mark.reliability
def test_the_leader_dies_under_load_none_is_lost_and_it_rejoins(cluster, etcd_prefix, counting_workers, summary):
    url = cluster_url(cluster)
    workers = counting_workers(url, 3, lease_ttl=LEASE_TTL, concurrency=4, pool=WORKER_POOL)
    victim, connected = lead_where_workers_are(cluster, [w.process.pid for w in workers])
    producer, collector = start_traffic(TASKS, TASK_SECONDS, interval=0.05, timeout=120)
    producer.sent_half.wait(60)

    victim.stop(kill=True)
    killed_at = time.time()
    survivors = [m for m in cluster if m is not victim]
    wait_until(lambda: leader_of(survivors), timeout=30, message="a new leader")
    elected_at = time.time()
    client = get_client(url)
    wait_for_completion(client, etcd_prefix, producer, timeout=120, collector=collector)

    tally = Tally.collect(f"leader of 3 SIGKILLed ({connected} of 3 workers on it)", client, etcd_prefix,
                          producer, killed_at, fault_end=elected_at,
                          collector=collector)
    summary(tally)
    assert_every_task_ran_once(tally, client, etcd_prefix, TASKS, collector)
    assert all(worker.process.poll() is None for worker in workers)
    assert not any(connected_ports(w.process.pid)[victim.port] for w in workers)

    victim.start()  # same name, ports and data dir: it rejoins as the member it was
    assert_rejoined(victim, cluster, etcd_prefix, set(tally.done))


def assert_rejoined(member: EtcdServer, cluster: list[EtcdServer], prefix: str, done: set[str]) -> None:
    """The member is in the member list, follows the leader, and serves what was written while it was down."""
    client = make_client(member.url)
    try:
        assert sorted(m.name for m in client.members) == sorted(m.name for m in cluster)
        wait_until(lambda: _done_tasks(client, prefix) >= done, timeout=30, message="caught up")
        assert member_status(member).leader == member_status(leader_of(cluster)).header.member_id
    finally:
        client.close()


def _done_tasks(client, prefix: str) -> set[str]:
    try:
        return set(read_markers(client, prefix, "done"))
    except CONNECTION_ERRORS:
        return set()
