"""One consumer process of a shared backlog (tests and benchmarks/bench_kombu_contract.py).

Usage: python -m tests.kombu_integration.share_consumer URL PREFIX QUEUE PREFETCH IDLE_SECONDS
Connects, prints "ready", waits for a line on stdin (so that every consumer of a test
starts together), consumes, and after IDLE_SECONDS without a message prints one JSON
line: the list of message numbers it acked. Works for etcdv3:// and redis:// URLs alike.
"""
from __future__ import annotations

import json
import sys
from time import monotonic

from kombu import Connection, Consumer, Queue

import etcd_broker  # noqa: F401 - registers etcdv3://

#: A consumer that got nothing stops waiting after this long (its empty list is the answer).
GIVE_UP_SECONDS = 60.0


def main() -> None:
    url, prefix, queue_name, prefetch, idle = sys.argv[1:6]
    options = {"prefix": prefix} if url.startswith("etcdv3") else {"global_keyprefix": prefix}
    got: list[int] = []

    def on_message(body, message):
        got.append(body["i"])
        message.ack()

    with Connection(url, transport_options=options) as conn:
        queue = Queue(queue_name, routing_key=queue_name)
        queue(conn.default_channel).declare()
        print("ready", flush=True)
        sys.stdin.readline()
        with Consumer(conn, [queue], callbacks=[on_message], prefetch_count=int(prefetch), accept=["json"]):
            started = monotonic()
            while True:
                try:
                    conn.drain_events(timeout=float(idle))
                except TimeoutError:
                    if got or monotonic() - started > GIVE_UP_SECONDS:
                        break
    print(json.dumps(got), flush=True)


if __name__ == "__main__":
    main()
