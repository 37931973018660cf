"""What clients see while etcd changes leader under write load."""
from __future__ import annotations

import threading
import time
import uuid

import grpc
import pytest

from etcd_broker.client import CONNECTION_ERRORS, make_client
from scripts.etcd_server import cluster_url
from tests.reliability.cluster_tools import leader_of, make_leader

WRITER_THREADS = 8
LEADER_MOVES = 4


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

