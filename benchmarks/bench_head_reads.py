"""What a queue's head read costs etcd, by how the read is bounded (issue 19, the claim path).

    python -m benchmarks.bench_head_reads [--live 0,10000,50000] [--dead 0,50000] [--calls 300]

One etcd from scripts/etcd_server.py (auto-compaction 5 m: nothing is compacted during a row).
For each state of one queue's ``ready/`` prefix (L live keys, D deleted keys ahead of them,
still in etcd's index until compaction), etcd CPU per call (from /proc) of:

* prefix: ``Range(ready/, limit=4)``, the transport's read today (etcd visits every key of the
  range to count it, the limit only caps what is returned);
* cursor: ``Range([first live key, end of ready/), limit=4)``, starting past the deleted keys
  (a cursor the consumer keeps, lowered by the put events its watch already sees);
* window: ``Range([first live key, first live key + 1 ms of sequence), limit=4)``, the cursor
  with a bounded end (sequence numbers are wall-clock ns, ops.py: a window is a time span;
  keys are filled 100 us apart, a queue fed at 10,000/s, so the window holds 10);
* count: ``Range(ready/, count_only=True)`` (what ``qsize`` and ``manage.py queues`` pay).

Redis and RabbitMQ have no counterpart (their queue head is a pointer): etcd alone here.
"""
from __future__ import annotations

import argparse
import os
import time

from etcd3 import etcdrpc

from benchmarks.common import print_table, process_cpu, progress
from etcd_broker.core import ops
from etcd_broker.core.client import make_client
from etcd_broker.core.ops import KeySpace, range_end
from scripts.etcd_server import EtcdServer

#: Puts per transaction while filling (etcd allows 128 operations per transaction).
FILL_BATCH = 100
#: The message body size written (a small Celery message is about 1 KB).
BODY = b"x" * 1000
#: Width of the bounded window read, in sequence units (ns).
WINDOW_NS = 1_000_000
#: Sequence units between two filled keys: 100 us, a queue fed at 10,000 messages/s.
SPACING_NS = 100_000


def fill(client, prefix: str, count: int, start: int) -> list[str]:
    keys = [f"{prefix}0/{start + index * SPACING_NS:020d}-0000" for index in range(count)]
    for first in range(0, count, FILL_BATCH):
        ops.txn(client, success=[ops.put(key, BODY, 0) for key in keys[first:first + FILL_BATCH]])
    return keys


def per_call_ms(server: EtcdServer, call, calls: int) -> float:
    call()
    before = process_cpu(server.process.pid)
    for _ in range(calls):
        call()
    return 1000 * (process_cpu(server.process.pid) - before) / calls


def row(server: EtcdServer, client, live: int, dead: int, calls: int) -> list:
    prefix = KeySpace(f"/head-{live}-{dead}-{time.time_ns()}").ready("q")
    if dead:
        gone = fill(client, prefix, dead, 10**12)
        request = etcdrpc.DeleteRangeRequest(key=gone[0].encode(), range_end=(gone[-1] + "\0").encode())
        client.call("DeleteRange", request)  # one request, a tombstone per key
    first_seq = 10**12 + dead * SPACING_NS
    fill(client, prefix, live, first_seq)
    cursor = f"{prefix}0/{first_seq:020d}"
    window_end = f"{prefix}0/{first_seq + WINDOW_NS:020d}"
    reads = {
        "prefix": lambda: client.get_range_response(prefix, range_end(prefix), limit=4),
        "cursor": lambda: client.get_range_response(cursor, range_end(prefix), limit=4),
        "window": lambda: client.get_range_response(cursor, window_end, limit=4),
        "count": lambda: client.get_range_response(prefix, range_end(prefix), count_only=True),
    }
    return [live, dead, *[f"{per_call_ms(server, read, calls):.3f}" for read in reads.values()],
            f"{os.getloadavg()[0]:.1f}"]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--live", default="0,10000,50000")
    parser.add_argument("--dead", default="0,50000")
    parser.add_argument("--calls", type=int, default=300)
    args = parser.parse_args(argv)
    server = EtcdServer().start()
    client = make_client(server.url, timeout=60)
    rows = []
    try:
        for dead in (int(n) for n in args.dead.split(",")):
            for live in (int(n) for n in args.live.split(",")):
                progress(f"head reads: {live} live keys behind {dead} deleted ones")
                rows.append(row(server, client, live, dead, args.calls))
    finally:
        client.close()
        server.cleanup()
    return print_table(f"etcd CPU ms per head read of one queue, {args.calls} calls each",
                       ["live keys", "deleted keys ahead", "prefix limit 4", "cursor limit 4", "window limit 4",
                        "count only", "load"], rows)


if __name__ == "__main__":
    main()
