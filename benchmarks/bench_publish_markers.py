"""What idempotent publish costs: etcd requests, proposals, keys and bytes per message, markers on and off.

    python -m benchmarks.bench_publish_markers [--messages 2000] [--threads 1 8]

One etcd (scripts/etcd_server.py). For each mode (``idempotent_publish`` True, False) and each
number of publishing threads, ``--messages`` plain kombu publishes (each thread its own
connection), then ``--messages`` in ``Producer.batch()``; counted from etcd's ``/metrics``
(gRPC requests received, Raft proposals committed, mvcc puts) and a count of the live keys under
the run's prefix after the publishes (the markers still alive). No timing: these are counts.
"""
from __future__ import annotations

import argparse
import threading
import uuid

from kombu import Connection

from benchmarks.common import etcd_counters, print_table, progress
from etcd_broker.core import ops
from etcd_broker.core.client import get_client
from scripts.etcd_server import EtcdServer

#: Body of each message (a small Celery-sized payload).
BODY = {"args": [1, 2], "kwargs": {"x": "y" * 200}}
COUNTED = ("rpc_Txn", "rpc_Range", "rpc_LeaseGrant", "proposals", "mvcc_put")


def publish(url: str, prefix: str, markers: bool, threads: int, messages: int, batch: bool) -> None:
    each = messages // threads

    def run() -> None:
        with Connection(url, transport_options={"prefix": prefix, "idempotent_publish": markers}) as conn:
            producer = conn.Producer(serializer="json")
            if batch:
                with producer.batch():
                    for _ in range(each):
                        producer.publish(BODY, routing_key="bench")
            else:
                for _ in range(each):
                    producer.publish(BODY, routing_key="bench")

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def measure(server: EtcdServer, markers: bool, threads: int, messages: int, batch: bool) -> list:
    prefix = f"/bench-{uuid.uuid4().hex[:8]}"
    client = get_client(server.url)
    with Connection(server.url, transport_options={"prefix": prefix}) as conn:  # declare outside the count
        conn.SimpleQueue("bench").close()
    before_size = client.status().db_size
    before = etcd_counters(server.client_url)
    publish(server.url, prefix, markers, threads, messages, batch)
    after = etcd_counters(server.client_url)
    keys = ops.get(client, prefix + "/", prefix=True, count_only=True).count
    per = {name: (after.get(name, 0) - before.get(name, 0)) / messages for name in COUNTED}
    return ["on" if markers else "off", threads, "batch" if batch else "plain",
            *(f"{per[name]:.3f}" for name in COUNTED), f"{keys / messages:.2f}",
            f"{(client.status().db_size - before_size) / messages:.0f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    server = EtcdServer()
    server.start()
    try:
        rows = []
        for threads in args.threads:
            for batch in (False, True):
                for markers in (True, False):
                    progress(f"markers {markers}, {threads} thread(s), batch {batch}")
                    rows.append(measure(server, markers, threads, args.messages, batch))
        print_table(f"idempotent publish: per message ({args.messages} messages per row)",
                    ["markers", "threads", "publish", "Txn requests", "Range requests", "LeaseGrant", "proposals",
                     "mvcc puts", "live keys", "db bytes"], rows)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
