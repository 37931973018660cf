"""A consumer in its own process, for tests that kill it: claims N messages, never acks, then waits.

Usage: python -m tests.transport.consumer_proc URL PREFIX QUEUE N LEASE_TTL
Prints one line per claimed message ("got <payload json>"), then "holding".
"""
from __future__ import annotations

import json
import sys
import time

from kombu import Connection

import etcd_broker  # noqa: F401


def main() -> None:
    url, prefix, queue, count, ttl = sys.argv[1:6]
    conn = Connection(url, transport_options={"prefix": prefix, "lease_ttl": int(ttl)})
    channel = conn.channel()
    for _ in range(int(count)):
        message = None
        while message is None:
            message = channel.basic_get(queue)
            if message is None:
                time.sleep(0.05)
        print("got", json.dumps(message.decode()), flush=True)
    print("holding", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
