"""What clients see while etcd changes leader under write load, and a worker fleet through four moves."""
from __future__ import annotations

import threading
import time
import uuid

import grpc
import pytest

from etcd_broker.core.client import CONNECTION_ERRORS, get_client, make_client
from scripts.etcd_server import cluster_url
from tests.reliability.cluster_tools import leader_of, make_leader
from tests.reliability.counting import (
    WORKER_POOL,
    Tally,
    assert_every_task_ran_once,
    start_traffic,
    wait_for_completion,
)

WRITER_THREADS = 8
LEADER_MOVES = 4
LEASE_TTL = 3
TASKS = 120
TASK_SECONDS = 0.2


@pytest.mark.reliability
def test_writes_during_leader_changes_fail_only_with_errors_kombu_retries(cluster):
    """etcd drops in-flight proposals when its leader changes ("raft proposal dropped", gRPC UNKNOWN);
    the client must report that as a connection error, or Celery would neither retry a publish nor
    keep a worker alive through an election."""
    url = cluster_url(cluster)
    retried, other = [], []
    stop = threading.Event()

    def write(thread: int) -> None:
        client = make_client(url)
        while not stop.is_set():
            try:
                client.put(f"/leader-moves/{thread}/{uuid.uuid4().hex}", "x")
            except CONNECTION_ERRORS as exc:
                retried.append(type(exc).__name__)
            except grpc.RpcError as exc:
                other.append(f"{exc.code().name}: {exc.details()}")
        client.close()

    writers = [threading.Thread(target=write, args=(i,), daemon=True) for i in range(WRITER_THREADS)]
    for writer in writers:
        writer.start()
    time.sleep(0.5)
    for move in range(LEADER_MOVES):
        followers = [m for m in cluster if m is not leader_of(cluster)]
        make_leader(cluster, followers[move % len(followers)])
    stop.set()
    for writer in writers:
        writer.join(10)
    assert other == []
    assert retried, "no write was interrupted: the leader changes did not happen under load"



@pytest.mark.reliability
@pytest.mark.parametrize("task", ["work", "work_batch"])
def test_four_leader_moves_under_load_run_every_task_exactly_once(cluster, etcd_prefix, counting_workers, summary,
                                                                  task):
    """Three workers (acks late) while leadership moves four times in a row: every move fails requests in
    flight, so workers reset their connections mid-task; nobody dies, so nothing may run twice."""
    url = cluster_url(cluster)
    workers = counting_workers(url, 3, lease_ttl=LEASE_TTL, concurrency=4, pool=WORKER_POOL)
    producer, collector = start_traffic(TASKS, TASK_SECONDS, interval=0.05, timeout=120, task=task)
    producer.sent_half.wait(60)

    moved_at = time.time()
    for move in range(LEADER_MOVES):
        followers = [m for m in cluster if m is not leader_of(cluster)]
        make_leader(cluster, followers[move % len(followers)])
    moves_done = time.time()
    client = get_client(url)
    wait_for_completion(client, etcd_prefix, producer, timeout=120, collector=collector)

    tally = Tally.collect(f"{LEADER_MOVES} leader moves in a row ({task})", client, etcd_prefix, producer, moved_at,
                          fault_end=moves_done, collector=collector)
    summary(tally)
    assert_every_task_ran_once(tally, client, etcd_prefix, TASKS, collector)
    assert all(worker.process.poll() is None for worker in workers)
