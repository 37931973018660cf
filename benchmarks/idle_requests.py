"""etcd requests by method, every 10 s, while one plain kombu consumer idles on Q empty queues.

    python -m benchmarks.idle_requests [--queues 1000] [--samples 10]

bench_growth's idle part gives requests/s over one 31 s window next to Redis and RabbitMQ; this
shows which periodic pass makes them (each 30 s timer's burst lands in one 10 s sample), etcd
alone (the rivals' idle cost is in bench_growth's table). The consumer is bench_growth's
(growth_clients.ConsumerGroup), on an etcd from scripts/etcd_server.py.
"""
from __future__ import annotations

import argparse
import re
import tempfile
import time
import urllib.request
import uuid
from collections import Counter

from benchmarks.growth_clients import ConsumerGroup
from scripts.etcd_server import EtcdServer

#: Seconds between two reads of etcd's request counters.
SAMPLE_SECONDS = 10.0


def handled(server: EtcdServer) -> Counter[str]:
    """etcd's ``grpc_server_handled_total`` by gRPC method."""
    text = urllib.request.urlopen(server.client_url + "/metrics", timeout=10).read().decode()
    counts: Counter[str] = Counter()
    for match in re.finditer(r'grpc_server_handled_total\{[^}]*grpc_method="(\w+)"[^}]*\} (\S+)', text):
        counts[match.group(1)] += float(match.group(2))
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queues", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=10)
    args = parser.parse_args(argv)
    server = EtcdServer(data_dir=tempfile.mkdtemp(prefix="idle-requests-"))
    server.start()
    tag = uuid.uuid4().hex[:6]
    started = time.monotonic()
    group = ConsumerGroup(server.url, [f"idle-{tag}-{n}" for n in range(args.queues)], 1).start(timeout=1800)
    try:
        print(f"one consumer on {args.queues} queues, ready after {time.monotonic() - started:.1f} s")
        print("| s since start | requests by method |\n|---|---|")
        before = handled(server)
        for _ in range(args.samples):
            time.sleep(SAMPLE_SECONDS)
            after = handled(server)
            delta = {method: int(after[method] - before[method]) for method in after if after[method] > before[method]}
            print(f"| {time.monotonic() - started:.0f} | {delta} |", flush=True)
            before = after
    finally:
        group.finish()
        server.stop()


if __name__ == "__main__":
    main()
