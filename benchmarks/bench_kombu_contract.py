"""Plain kombu on our etcd transport and on Redis, in one run (issue 11's numbers).

    python -m benchmarks.bench_kombu_contract [--messages 10000] [--consumers 4] [--prefetch 10]

* publish: seconds for one producer thread to send N small messages with ``Producer.publish``,
  one by one and inside ``Producer.batch()`` (kombu 5.7's batch API);
* share: N messages for C consumer processes (prefetch P), published before the consumers
  start (a backlog) or one by one while they wait; how many each consumer got, whether
  every message arrived exactly once, and the seconds until the last consumer went idle.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from contextlib import nullcontext

from kombu import Connection, Producer, Queue

import etcd_broker  # noqa: F401 - registers etcdv3://
from benchmarks.common import REPO_ROOT, RedisServer, print_table, progress
from scripts.etcd_server import EtcdServer

#: Messages per Producer.batch() flush (etcd writes them in transactions of at most 128).
BATCH_SIZE = 1000
#: A consumer that saw nothing for this long is done (it then reports what it got).
IDLE_SECONDS = 3.0


def options(url: str, prefix: str) -> dict:
    return {"prefix": prefix} if url.startswith("etcdv3") else {"global_keyprefix": prefix}


def publish(url: str, prefix: str, queue_name: str, count: int, batch: int = 0) -> float:
    """Send ``count`` messages from one thread (in ``Producer.batch(batch)`` if > 0); return the seconds."""
    queue = Queue(queue_name, routing_key=queue_name)
    with Connection(url, transport_options=options(url, prefix)) as conn, conn.channel() as channel:
        producer = Producer(channel)
        producer.publish({"i": -1}, routing_key=queue_name, declare=[queue])  # connect and declare first
        started = time.perf_counter()
        with producer.batch(max_size=batch) if batch else nullcontext():
            for i in range(count):
                producer.publish({"i": i}, routing_key=queue_name)
        return time.perf_counter() - started


def share(url: str, prefix: str, count: int, consumers: int, prefetch: int,
          backlog_first: bool) -> tuple[list[int], bool, float]:
    """``count`` messages for ``consumers`` processes; (per-consumer counts, exactly once?, seconds).

    ``backlog_first``: the messages wait before the consumers start (a worker pool coming
    up on a backlog); else they are published one by one while the consumers wait.
    """
    queue_name = "shared"
    procs = [subprocess.Popen([sys.executable, "-m", "tests.kombu_integration.share_consumer", url, prefix,
                               queue_name, str(prefetch), str(IDLE_SECONDS)], cwd=REPO_ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(consumers)]
    try:
        for proc in procs:
            proc.stdout.readline()  # "ready": connected and declared
        if backlog_first:
            publish(url, prefix, queue_name, count, BATCH_SIZE)
        started = time.perf_counter()
        for proc in procs:  # all start consuming together
            proc.stdin.write("go\n")
            proc.stdin.flush()
        if not backlog_first:
            publish(url, prefix, queue_name, count)
        shares = [json.loads(proc.communicate(timeout=600)[0].splitlines()[-1]) for proc in procs]
        seconds = time.perf_counter() - started - IDLE_SECONDS
    finally:
        for proc in procs:
            proc.kill()
    received = sorted(i for got in shares for i in got if i >= 0)
    return [len([i for i in got if i >= 0]) for got in shares], received == list(range(count)), seconds


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--consumers", type=int, default=4)
    parser.add_argument("--prefetch", type=int, default=10)
    args = parser.parse_args(argv)
    redis_server = RedisServer()
    etcd = EtcdServer().start()
    rows_publish, rows_share = [], []
    try:
        for name, url in (("etcd", etcd.url), ("redis", redis_server.url())):
            progress(f"{name}: publish {args.messages}")
            for batch in (0, BATCH_SIZE):
                seconds = publish(url, f"/bench-{uuid.uuid4().hex[:8]}", "published", args.messages, batch)
                rows_publish.append([name, f"Producer.batch({batch})" if batch else "one by one",
                                     args.messages, seconds, round(args.messages / seconds)])
            for backlog_first in (True, False):
                progress(f"{name}: {args.consumers} consumers share {args.messages}")
                counts, once, seconds = share(url, f"/bench-{uuid.uuid4().hex[:8]}", args.messages,
                                              args.consumers, args.prefetch, backlog_first)
                rows_share.append([name, "before the consumers start" if backlog_first else "while they wait",
                                   args.messages, args.consumers, args.prefetch, str(counts),
                                   "yes" if once else "NO", seconds])
    finally:
        etcd.stop()
        redis_server.stop()
    text = print_table("kombu publish, one producer thread",
                       ["broker", "how", "messages", "seconds", "messages/s"], rows_publish)
    text += "\n\n" + print_table("a backlog shared by idle consumers",
                                 ["broker", "published", "messages", "consumers", "prefetch", "per consumer",
                                  "each exactly once", "seconds to drain"], rows_share)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
