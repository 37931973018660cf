"""The benchmarks' measuring instruments, against real servers: etcd's counters, the etcd call
counter, the durable Redis and the throw-away RabbitMQ node bench_main starts, and the
profile's grouping of etcd history and py-spy stacks."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from etcd3.etcdrpc import kv_pb2

from benchmarks import etcd_calls
from benchmarks.common import RabbitMQServer, RedisServer, etcd_counters
from benchmarks.profile_main import owned_events, phase_of, read_stacks, revision_kinds, writes_per_job
from etcd_broker.core import ops
from etcd_broker.core.client import make_client
from scripts.etcd_server import EtcdServer

TASK_A = "0b8f3c52-6f1e-4d7a-9a51-1c2d3e4f5a6b"
TASK_B = "9c1d2e3f-4a5b-4c6d-8e7f-0a1b2c3d4e5f"


@pytest.fixture(scope="module")
def own_etcd(tmp_path_factory):
    """An etcd no other test writes to, so that its counters move only with this test's requests."""
    server = EtcdServer(data_dir=str(tmp_path_factory.mktemp("etcd-counters"))).start()
    yield server
    server.cleanup()


def test_it_counts_proposals_and_requests_by_method(own_etcd, etcd_prefix):
    etcd_server = own_etcd
    client = make_client(etcd_server.url)
    try:
        before = etcd_counters(etcd_server.client_url)
        client.put(f"{etcd_prefix}/a", b"1")
        ops.txn(client, success=[ops.put(f"{etcd_prefix}/b", b"2"), ops.put(f"{etcd_prefix}/c", b"3")])
        for _ in range(3):
            ops.get(client, f"{etcd_prefix}/a")
        after = etcd_counters(etcd_server.client_url)
    finally:
        client.close()
    delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    assert delta["rpc_Put"] == 1
    assert delta["rpc_Txn"] == 1
    assert delta["rpc_Range"] >= 3
    assert delta["proposals"] == 2  # the put and the txn; reads are no proposals
    assert delta["mvcc_put"] >= 3  # one by Put, two inside the txn
    assert delta["wal_fsyncs"] >= 1


def test_it_counts_etcd_calls_by_the_code_that_made_them(etcd_server, etcd_prefix):
    etcd_calls.install()
    try:
        client = make_client(etcd_server.url)  # its stubs are made after install()
        before = etcd_calls.snapshot()
        try:
            ops.txn(client, success=[ops.put(f"{etcd_prefix}/x", b"1")])
            ops.get(client, f"{etcd_prefix}/x")
        finally:
            client.close()
        after = etcd_calls.snapshot()
    finally:
        etcd_calls.uninstall()
    delta = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)}
    assert sum(v for k, v in delta.items() if k.startswith("Txn <- ")) == 1
    assert sum(v for k, v in delta.items() if k.startswith("Range <- ")) == 1
    assert all(k.endswith("(outside etcd_broker)") for k in delta)  # called from this test, not the library


def test_it_starts_redis_with_fsync_on_every_write():
    server = RedisServer(durable=True)
    try:
        import redis

        client = redis.Redis(port=server.port)
        assert client.config_get("appendfsync") == {"appendfsync": "always"}
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        before = server.commands()
        client.set("k", "v")
        assert server.commands() - before == 2  # the SET and the INFO that counts
    finally:
        server.stop()
    assert not os.path.exists(server.dir)


@pytest.mark.slow
@pytest.mark.skipif(not os.access("/usr/lib/rabbitmq/bin/rabbitmq-server", os.X_OK),
                    reason="rabbitmq-server not installed (scripts/system-deps.sh bench)")
def test_it_runs_a_throwaway_rabbitmq_node_and_leaves_nothing_behind():
    from kombu import Connection

    server = RabbitMQServer()
    try:
        with Connection(server.url()) as connection:
            queue = connection.SimpleQueue("bench-instruments")
            queue.put({"n": 1})
            assert queue.get(timeout=10).payload == {"n": 1}
            queue.close()
    finally:
        server.stop()
    assert server.process.poll() is not None
    assert not os.path.exists(server.dir)
    epmd = shutil.which("epmd")
    if epmd:  # our epmd answers no more on its port
        names = subprocess.run([epmd, "-names"], env=server.env(), capture_output=True, text=True, check=False)
        assert names.returncode != 0 or "up and running" not in names.stdout


def event(kind: int, key: str, value: str, revision: int) -> kv_pb2.Event:
    return kv_pb2.Event(type=kind, kv=kv_pb2.KeyValue(key=key.encode(), value=value.encode(), mod_revision=revision))


def test_it_groups_etcd_history_by_job_and_revision():
    put, delete = kv_pb2.Event.PUT, kv_pb2.Event.DELETE
    events = [
        event(put, f"/p/q/ready/5/{1}", f'{{"id": "{TASK_A}"}}', 10),
        event(put, f"/p/q/ready/5/{2}", f'{{"id": "{TASK_B}"}}', 11),
        event(delete, "/p/q/ready/5/1", "", 12), event(delete, "/p/q/ready/5/2", "", 12),  # one claim txn, 2 jobs
        event(put, f"/p/results/{TASK_A}", "{}", 13),
        event(put, f"/p/results/{TASK_B}", "{}", 14),
        event(put, "/p/members/x", "", 15),
    ]
    owned = owned_events(events, [TASK_A, TASK_B], "/p")
    sequences, stray = writes_per_job(owned)
    assert sequences == {("PUT /q/ready/<id>/<id>", "DELETE /q/ready/<id>/<id>", "PUT /results/<id>"): 2}
    assert stray == {"PUT /members/x": 1}
    kinds = {row[0]: (row[1], row[2]) for row in revision_kinds(owned, jobs=2)}
    assert kinds["`DELETE /q/ready/<id>/<id>`"] == ("0.500", "2.0")  # one claim revision shared by both jobs
    assert kinds["`PUT /results/<id>`"] == ("1.000", "1.0")
    assert kinds["`PUT /members/x`"] == ("0.500", "0.0")


def test_it_names_what_each_profile_sample_was_doing(tmp_path):
    raw = tmp_path / "worker.txt"
    raw.write_text(
        "Thread.run (threading.py:982);trace_task (celery/app/trace.py:453);"
        "Backend.store_result (celery/backends/base.py:530);txn (etcd_broker/core/ops.py:130) 7\n"
        "Thread.run (threading.py:982);trace_task (celery/app/trace.py:453);"
        "ModelHost.run (ml/serving.py:90);preprocess (ml/digits.py:50) 5\n"
        "Thread.run (threading.py:982);channel_spin (grpc/_channel.py:2000) 2\n"
        "Thread.run (threading.py:982);Transport.on_readable (etcd_broker/transport/channel.py:600);"
        "txn (etcd_broker/core/ops.py:130) 1\n")
    stacks = read_stacks(raw)
    assert sum(stacks.values()) == 15
    phases = {phase_of(frames): count for frames, count in stacks.items()}
    assert phases[next(p for p in phases if p.startswith("result writes"))] == 7
    assert phases[next(p for p in phases if p.startswith("model"))] == 5
    assert phases["grpc (its own threads and helpers)"] == 2
    assert phases[next(p for p in phases if p.startswith("transport"))] == 1  # ops.py is only the carrier
